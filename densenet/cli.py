"""The ``densenet`` command: ``densenet models``, ``info``, ``train``, ``eval``, ``predict``, ``export``,
``explain``, ``weights``, ``reuse``, ``table``, ``plot``."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .analysis import (
    TABLE2,
    TABLE2_DATASETS,
    class_metrics,
    confusion_matrix,
    feature_reuse,
    format_class_table,
    format_confusion,
    load_run,
    markdown_table,
    plot_confusion,
    plot_curves,
    plot_efficiency,
    plot_reuse,
    render_csv,
    render_markdown,
    table_records,
    top5_applies,
    write_confusion_csv,
    write_reuse_csv,
)
from .analysis.explain import METHODS, ExplainError
from .analysis.multilabel_metrics import format_label_table, multilabel_metrics
from .analysis.plots import plot_roc
from .data import DataError, build_data
from .errors import DenseNetError, MissingDependency, MissingFile
from .io.atomic import atomic_write_text
from .models import count_macs, count_parameters, create_model, list_models, list_weights, model_spec, stage_summary
from .serving import (
    FORMATS,
    expand_image_paths,
    explain_images,
    export_checkpoint,
    export_model,
    folder_truth,
    load_predictor,
    model_from_checkpoint,
    model_from_weights,
    predict_images,
    predict_images_tta,
    resolve_class,
)
from .serving.export import SUFFIXES
from .serving.inference import OnnxModel
from .serving.int8 import is_int8_file, write_int8
from .serving.predict import image_options
from .serving.quantize import AGREEMENT_WARNING, calibration_arrays, quantize_model
from .serving.tta import TTA_MODES, check_tta
from .training import TrainingStopped, evaluate, evaluate_tta, load_run_config, resolve_config, train
from .training.config import ConfigError, TrainConfig, field_help, field_types, type_name
from .training.evaluate import score_multilabel
from .training.loop import resolve_device


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        spec = model_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = create_model(name)
        params = count_parameters(model)
        macs = count_macs(model, spec.input_size)
        rows.append([name, spec.depth, spec.growth_rate, spec.family, f"{params:,}",
                     f"{spec.paper_params:,}", f"{spec.input_size}x{spec.input_size}", f"{macs / 1e9:.3f}"])
    print(markdown_table(["name", "depth", "k", "layout", "parameters", "paper", "input", "GMACs"], rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    spec = model_spec(args.name)
    dims = args.spatial_dims or 2
    with torch.device("meta"):
        classes = spec.kwargs["num_classes"] if args.num_classes is None else args.num_classes
        extra = {"in_channels": args.in_channels} if args.in_channels else {}
        model = create_model(args.name, num_classes=classes, spatial_dims=dims, **extra)
    size = args.input_size or spec.input_size
    model.check_input_size(size)
    shape = "x".join([str(size)] * dims)
    print(f"{args.name}: {model.extra_repr()}")
    print(f"parameters: {count_parameters(model):,}; multiply-adds at {shape}: "
          f"{count_macs(model, size) / 1e9:.3f} G\n")
    rows = [[s.name, s.in_channels, s.out_channels, "x".join([str(s.size)] * dims), f"{s.params:,}"]
            for s in stage_summary(model, size)]
    print(markdown_table(["stage", "in", "out", "output size", "parameters"], rows))
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--no-nesterov``, ...), typed by the field's
    annotation and described by its help text; absent flags leave the recipe's value, so only what
    the user typed overrides it."""
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": field_help(f.name)}
        annotation = types[f.name]
        base = [a for a in typing.get_args(annotation) if a is not type(None)][0] if typing.get_args(annotation) else annotation
        if annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(annotation) is list:
            p.add_argument(flag, type=typing.get_args(annotation)[0], nargs="*", metavar="EPOCH", **kw)
        elif typing.get_origin(base) is list:  # one value or several (--image-size 96, or 96 112 80)
            p.add_argument(flag, type=typing.get_args(base)[0], nargs="+", metavar="N", **kw)
        elif base is not annotation and base in (int, float):  # int | None, float | None: "none" unsets it
            p.add_argument(flag, type=_or_none(base), metavar=type_name(base).upper(), **kw)
        else:
            p.add_argument(flag, type=base, metavar=type_name(base).upper(), **kw)
    p.add_argument("--config", help="YAML file of the same keys (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in an --out directory that holds another run")


def _or_none(kind: type) -> Callable[[str], object]:
    """argparse type: ``kind(text)``, or None for ``none`` (a recipe's value turned off, e.g. --ema-decay none)."""
    def parse(text: str) -> object:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} or none, "
                                             f"got {text!r}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "force")}
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the configuration of the run it continues; drop --config")
        config = load_run_config(Path(args.resume), overrides)
    else:
        config = resolve_config(overrides, args.config)
    train(config, resume=bool(args.resume), force=args.force)
    return 0


def trained_model(args: argparse.Namespace, path: str | None) -> tuple[torch.nn.Module, dict]:
    """The model a command works on: named trained weights (``--weights``, with ``--model``) or the
    checkpoint at ``path`` (its weight average or raw weights as ``--ema`` says)."""
    ema = ema_choice(args)
    if args.weights:
        if path and not args.model:
            raise ConfigError(f"give either a checkpoint ({path}) or --weights, not both")
        if ema is not None:
            raise ConfigError(f"--ema {args.ema} chooses between the weights of a checkpoint; named weights "
                              f"({args.weights}) are one set: drop --ema")
        return model_from_weights(args.weights, args.model)
    if not path:
        raise ConfigError("give a checkpoint (densenet train's checkpoint.pt) or trained weights by name "
                          "(--model NAME --weights TAG; `densenet weights` lists them)")
    return model_from_checkpoint(path, ema=ema)


def ema_choice(args: argparse.Namespace) -> bool | None:
    """``--ema auto|yes|no`` as None (the run's choice), True, False."""
    return {"auto": None, "yes": True, "no": False}[getattr(args, "ema", "auto")]


def add_ema_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", choices=("auto", "yes", "no"), default="auto",
                   help="a checkpoint's weights: auto (the default: the exponential moving average of the weights when "
                        "the run was trained with --ema-eval, else the raw weights), yes (the average; the run must "
                        "have kept one, --ema-decay) or no (the raw weights)")


def add_tta_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tta", choices=TTA_MODES, help=f"test-time augmentation: flip averages the softmax of each image and "
                                                    f"its horizontal mirror; {what} beside the single-crop one (images "
                                                    "only)")


def add_weights_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="TAG", help="trained weights by name instead of a checkpoint: a tag with "
                   "--model (e.g. --model densenet121 --weights imagenet) or MODEL.TAG (see `densenet weights`)")
    p.add_argument("--model", metavar="NAME", help="the model of --weights")


def cmd_weights(args: argparse.Namespace) -> int:
    rows = []
    for w in list_weights(args.model):
        top1, top5, flip = (w.accuracy.get(k) for k in ("top1", "top5", "top1_flip"))
        size = f"{w.file_size / 2**20:.1f} MB" if w.file_size else "?"
        rows.append([w.name, w.dataset, w.num_classes, f"{w.input_size}x{w.input_size}",
                     *("" if v is None else f"{v:.2f}" for v in (top1, top5, flip)), size,
                     "in the package" if w.url is None else w.url])
    print(markdown_table(["weights", "dataset", "classes", "input", "top-1 %", "top-5 %", "top-1 % flip-averaged", "file",
                          "from"], rows))
    print("\nLoad with create_model(MODEL, weights=TAG), or --model MODEL --weights TAG on eval, predict, export, train.")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    onnx = bool(args.checkpoint) and Path(args.checkpoint).suffix.lower() == ".onnx"  # run by ONNX Runtime
    if onnx or (args.checkpoint and is_int8_file(args.checkpoint)):
        if args.weights or args.ema != "auto":
            raise ConfigError(f"{args.checkpoint} is {'an ONNX export' if onnx else 'an int8 model'}, which holds one set "
                              "of weights: drop " + ("--weights" if args.weights else f"--ema {args.ema}"))
        run, data = load_predictor(args.checkpoint)
        model = OnnxModel(run, data) if onnx else run
        info = {**data, "model": data.get("model") or Path(args.checkpoint).name}
        if not info.get("dataset") and not args.dataset:
            raise ConfigError(f"{args.checkpoint} does not record its dataset; give --dataset")
    else:
        model, info = trained_model(args, args.checkpoint)
    check_tta(args.tta, model.spatial_dims)
    device = resolve_device(args.device)
    model.to(device)
    dataset = args.dataset or info["dataset"]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{dataset}" if args.checkpoint else None
    labels = {}
    if dataset == "csv":  # the label file's test split, read as in training
        labels = dict(image_root=args.image_root, uncertain=info.get("uncertain", "zeros"),
                      group_column=info.get("group_column"), image_options=image_options(info))
    data = build_data(dataset, args.data, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                      workers=args.workers, image_size=info["image_size"], seed=info.get("seed", 0), **labels)
    if data.multilabel:
        return eval_labels(args, model, info, data, device, out)
    if data.num_classes != model.num_classes:
        raise DataError(f"{dataset} has {data.num_classes} classes but the model has {model.num_classes}")
    if dataset == "folder" and info.get("class_names") and list(info["class_names"]) != data.class_names:
        raise DataError(f"the class folders of {args.data} ({', '.join(data.class_names[:10])}) are not the classes the "
                        f"model was trained on ({', '.join(info['class_names'][:10])}); lay the images out by the same "
                        "class names")
    if args.tta:
        result, averaged = evaluate_tta(model, data.test.batches(0), device, args.tta)
    else:
        result, averaged = evaluate(model, data.test.batches(0), device), None
    top5 = f", top-5 error {result.top5_error:.2f}%" if top5_applies(data.num_classes) else ""
    print(f"{dataset} test set, {result.images} images: top-1 error {result.top1_error:.2f}%{top5}"
          + (" (weight average)" if info.get("ema") else ""))
    summary = {"dataset": dataset, "data": args.data, "images": result.images, "top1_error": result.top1_error,
               "top5_error": result.top5_error if top5 else None, "class_names": data.class_names,
               "weights": "average" if info.get("ema") else "raw"}
    if averaged is not None:  # beside the single-crop figure, never instead of it
        print(f"{args.tta}-averaged (--tta {args.tta}): top-1 error {averaged.top1_error:.2f}%"
              + (f", top-5 error {averaged.top5_error:.2f}%" if top5 else ""))
        summary.update(tta=args.tta, tta_top1_error=averaged.top1_error, tta_top5_error=averaged.top5_error if top5 else None)
    if dataset == "imagenet":
        crops = evaluate(model, data.test.batches(0, ten_crop=True), device)
        print(f"10-crop: top-1 error {crops.top1_error:.2f}%" + (f", top-5 error {crops.top5_error:.2f}%" if top5 else ""))
        summary.update(ten_crop_top1_error=crops.top1_error, ten_crop_top5_error=crops.top5_error if top5 else None)
    if result.confusion is not None:
        summary.update(report_classes(result.confusion.numpy(), data.class_names))
        if out is None:
            print("(give --out DIR to write the confusion matrix and the metrics)")
        else:
            write_eval_files(out, result.confusion.numpy(), data.class_names, summary,
                             title=f"{info.get('model') or 'model'} on {dataset}: test split, {result.images:,} images")
    return 0


def eval_labels(args: argparse.Namespace, model, info: dict, data, device: torch.device, out: Path | None) -> int:
    """``densenet eval`` of a multi-label model on a label file's test split: the per-label table, and
    eval.json and roc.png in ``out``."""
    if list(info.get("class_names", [])) != data.class_names:
        raise DataError(f"the labels of {args.data} ({', '.join(data.class_names[:10])}) are not the labels the model was "
                        f"trained on ({', '.join(info.get('class_names', [])[:10])})")
    if args.tta:
        raise ConfigError("--tta is for single-label models; a multi-label evaluation scores each image once")
    scores = score_multilabel(model, data.test.batches(0), device)
    thresholds = info.get("thresholds")
    metrics = multilabel_metrics(scores.targets, scores.scores, data.class_names, thresholds)
    print(f"{args.data} test split, {scores.images} images, {len(data.class_names)} labels "
          f"(thresholds {'chosen on the validation split' if thresholds else '0.5'}):\n{format_label_table(metrics)}")
    if out is None:
        print("(give --out DIR to write eval.json and roc.png)")
        return 0
    if not out.parent.is_dir():
        raise MissingFile(f"cannot write into {out}: the folder {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    plot_roc(out / "roc.png", scores.targets, scores.scores, data.class_names,
             title=f"{info.get('model') or 'model'}: test split of {Path(args.data).name}, {scores.images:,} images")
    summary = {"dataset": "csv", "data": args.data, "images": scores.images, "label_error": scores.label_error(thresholds),
               "mean_auroc": metrics["mean_auroc"], "mean_average_precision": metrics["mean_average_precision"],
               "labels_without_auroc": metrics["undefined"], "per_label": metrics["labels"]}
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'roc.png'} and {out / 'eval.json'}")
    return 0


def report_classes(confusion, class_names: list[str]) -> dict:
    """Print the confusion matrix and the per-class metrics (or how to get them); return the metrics."""
    print("confusion matrix (rows: true class, columns: predicted class):\n" + format_confusion(confusion, class_names))
    try:
        metrics = class_metrics(confusion, class_names)
    except MissingDependency as e:
        print(f"({e})")
        return {}
    if metrics:
        print(f"balanced accuracy {metrics['balanced_accuracy']:.2f}%, macro F1 {metrics['macro_f1']:.2f}%")
        if len(class_names) <= 30:
            print(format_class_table(metrics))
    return metrics


def write_eval_files(out: Path, confusion, class_names: list[str], summary: dict, title: str) -> None:
    """confusion.csv (counts), confusion.png (normalised by row) and eval.json into folder ``out``."""
    if not out.parent.is_dir():
        raise MissingFile(f"cannot write into {out}: the folder {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    write_confusion_csv(out / "confusion.csv", confusion, class_names)
    plot_confusion(out / "confusion.png", confusion, class_names, title=title + "\n(rows: true class, normalised by row)")
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'confusion.csv'}, {out / 'confusion.png'} and {out / 'eval.json'}")


def cmd_predict(args: argparse.Namespace) -> int:
    if args.weights:  # every positional is an image
        images = [args.checkpoint, *args.images] if args.checkpoint else args.images
        model, info = model_from_weights(args.weights, args.model)
        if args.image_size:
            model.check_input_size(args.image_size)
            info = {**info, "image_size": args.image_size}
    else:
        if not args.images:
            raise ConfigError("give a model file (checkpoint, .onnx, .pt2 or .safetensors) and images, or "
                              "--model NAME --weights TAG and images")
        model, info = load_predictor(args.checkpoint, args.image_size, ema=ema_choice(args))
        images = args.images
    if args.weights and args.ema != "auto":
        raise ConfigError(f"--ema {args.ema} chooses between the weights of a checkpoint; named weights "
                          f"({args.weights}) are one set: drop --ema")
    check_tta(args.tta, getattr(model, "spatial_dims", None))
    skipped = []

    def skip(path, error: Exception) -> None:
        print(f"densenet predict: skipped {error}", file=sys.stderr)
        skipped.append(path)

    names = list(info["class_names"])
    index = {name: i for i, name in enumerate(names)}
    files = list(expand_image_paths(images))
    if info.get("multilabel"):
        return predict_labels(args, model, info, files, skip if args.skip_bad else None, skipped)
    truth = dict(zip(files, folder_truth(files, names))) if args.truth_from_folders else {}
    rows, pairs, tta_right = [], [], 0
    on_error = skip if args.skip_bad else None
    if args.tta:
        predictions = predict_images_tta(model, files, info, tta=args.tta, top=args.top, on_error=on_error)
    else:
        predictions = ((path, top, None) for path, top in predict_images(model, files, info, top=args.top,
                                                                          on_error=on_error))
    for path, top, averaged in predictions:
        print(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top)
              + ("" if averaged is None else f"; {args.tta}-averaged: " + ", ".join(f"{n} {p:.1%}" for n, p in averaged)))
        rows.append([str(path)] + [x for name, p in top for x in (name, f"{p:.6f}")]
                    + [x for name, p in averaged or [] for x in (name, f"{p:.6f}")])
        if truth:
            pairs.append((truth[path], index.get(top[0][0], -1)))
            tta_right += averaged is not None and index.get(averaged[0][0], -1) == truth[path]
            rows[-1].insert(1, names[truth[path]])
    if not rows:
        raise DataError(f"no image could be scored in {', '.join(images)}"
                         + (f" ({len(skipped)} skipped)" if skipped else " (no image files found)"))
    if truth:
        confusion = confusion_matrix(*zip(*pairs), len(names))
        right = int(confusion.trace())
        print(f"\ntruth from folders: {len(pairs)} images, accuracy {100 * right / len(pairs):.2f}% ({right} right)"
              + (f"; {args.tta}-averaged accuracy {100 * tta_right / len(pairs):.2f}% ({tta_right} right)"
                 if args.tta else ""))
        report_classes(confusion, names)
    if args.csv:
        _check_out_folder(args.csv)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        ranks = range(min(args.top, len(names)))
        writer.writerow(["image"] + (["true_class"] if truth else []) + [f"{c}{i + 1}" for i in ranks for c in ("class", "prob")]
                        + ([f"{args.tta}_{c}{i + 1}" for i in ranks for c in ("class", "prob")] if args.tta else []))
        writer.writerows(rows)
        atomic_write_text(args.csv, buffer.getvalue())
    return 0


def predict_labels(args: argparse.Namespace, model, info: dict, files: list[Path], on_error, skipped: list) -> int:
    """``densenet predict`` of a multi-label model: every label's probability, and the labels at or above
    the thresholds saved with the model (0.5 without them), printed and written to ``--csv``."""
    if args.truth_from_folders:
        raise ConfigError("--truth-from-folders is for single-label models; for a multi-label model give the label file "
                          "to densenet eval")
    names = list(info["class_names"])
    thresholds = info.get("thresholds") or [0.5] * len(names)
    if args.tta:
        predictions = predict_images_tta(model, files, info, tta=args.tta, on_error=on_error)
    else:
        predictions = ((path, probs, None) for path, probs in predict_images(model, files, info, on_error=on_error))
    rows = []
    for path, probs, averaged in predictions:
        use = averaged or probs
        positive = [n for (n, p), t in zip(use, thresholds) if p >= t]
        print(f"{path}: {'|'.join(positive) or '(none)'}; " + ", ".join(f"{n} {p:.1%}" for n, p in use))
        rows.append([str(path), *(f"{p:.9g}" for _, p in use), "|".join(positive)])
    if not rows:
        raise DataError(f"no image could be scored in {', '.join(map(str, args.images))}"
                        + (f" ({len(skipped)} skipped)" if skipped else " (no image files found)"))
    if args.csv:
        _check_out_folder(args.csv)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", *names, "positive_labels"])
        writer.writerows(rows)
        atomic_write_text(args.csv, buffer.getvalue())
    return 0


def _check_out_folder(path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise MissingFile(f"cannot write {path}: the folder {folder} does not exist")


def cmd_explain(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if source.is_file():
        if source.suffix.lower() in (".onnx", ".pt2"):
            kind = "an ONNX export" if source.suffix.lower() == ".onnx" else "a torch.export program"
            raise ExplainError(f"{source} is {kind}: explanations need gradients through the PyTorch model; "
                               "give its checkpoint (checkpoint.pt) or the trained weights by name")
        if is_int8_file(source):
            raise ExplainError(f"{source} is an int8 model, which has no gradients: explanations need them through the "
                               "float model; give its checkpoint (checkpoint.pt) or the trained weights by name")
        model, info = load_predictor(source, args.image_size)
    else:
        try:
            model, info = model_from_weights(args.source)
        except DenseNetError as e:
            raise MissingFile(f"{source} is neither a file nor trained weights by name: {e}") from None
        if args.image_size:
            model.check_input_size(args.image_size)
            info = {**info, "image_size": args.image_size}
    skipped = []

    def skip(path: Path, error: Exception) -> None:
        print(f"densenet explain: skipped {error}", file=sys.stderr)
        skipped.append(path)

    target = resolve_class(args.target, list(info["class_names"]))
    done = explain_images(model, info, args.images, args.out, method=args.method, target=target, layer=args.layer,
                          top=args.top, on_error=skip if args.skip_bad else None)
    if not done:
        raise DataError(f"no image could be explained in {', '.join(args.images)}"
                        + (f" ({len(skipped)} skipped)" if skipped else " (no image files found)"))
    for e in done:
        print(f"{e.image}: {', '.join(f'{n} {p:.1%}' for n, p in e.top)}; map for {e.explained} in {e.overlay}")
    if args.csv:
        _check_out_folder(args.csv)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "explained", "overlay", "map"] + [f"{c}{i + 1}" for i in range(args.top)
                                                                     for c in ("class", "prob")])
        writer.writerows([str(e.image), e.explained, str(e.overlay), str(e.raw)]
                         + [x for n, p in e.top for x in (n, f"{p:.6f}")] for e in done)
        atomic_write_text(args.csv, buffer.getvalue())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.int8:
        return export_int8(args)
    if args.calibration:
        raise ConfigError("--calibration is for --int8: add --int8, or drop --calibration")
    if args.format is None:
        raise ConfigError(f"give --format ({', '.join(FORMATS)}), or --int8 for an int8 model")
    if args.weights:
        model, info = trained_model(args, args.checkpoint)  # refuses --ema yes/no
        out = args.out or info["weights"] + SUFFIXES[args.format]
        result = export_model(model, out, args.format, image_size=args.image_size or info["image_size"], data=info,
                              name=info["model"], opset=args.opset)
    else:
        if not args.checkpoint:
            raise ConfigError("give a checkpoint to export, or --model NAME --weights TAG")
        result = export_checkpoint(args.checkpoint, args.out, args.format, image_size=args.image_size, opset=args.opset,
                                   ema=ema_choice(args))
    files = ", ".join(map(str, result["files"]))
    print(f"wrote {files} ({args.format}; outputs within {result['max_abs_diff']:.1e} of PyTorch on a test batch)")
    return 0


def export_int8(args: argparse.Namespace) -> int:
    """``densenet export --int8``: an int8 model calibrated on --calibration's images, for PyTorch's int8
    convolutions (``.int8.safetensors``, the default) or, with ``--format onnx``, ONNX Runtime (QDQ)."""
    if args.format not in (None, "onnx"):
        raise ConfigError(f"--int8 writes an int8 model for PyTorch (the default: drop --format) or, with --format onnx, "
                          f"for ONNX Runtime; not --format {args.format}")
    if not args.calibration:
        raise ConfigError("--int8 needs calibration images: --calibration DATA (a folder or zip of images laid out as "
                          "for training, a dataset archive, or 'sample' for the bundled CIFAR-10 sample)")
    model, info = trained_model(args, args.checkpoint)
    if model.spatial_dims != 2 or info.get("multilabel"):
        raise ConfigError("--int8 quantizes single-label image classifiers; this model is not one")
    size = args.image_size or info["image_size"]
    dataset = args.calibration_dataset or str(info.get("dataset") or "folder").removesuffix("+")
    root = None if args.calibration == "sample" else args.calibration
    data = build_data(dataset, root, batch_size=64, eval_batch_size=64, workers=0, image_size=size)
    if data.num_classes != model.num_classes:
        raise DataError(f"the calibration data ({args.calibration}, read as {dataset}) has {data.num_classes} classes but "
                        f"the model has {model.num_classes}; calibrate on the data the model was trained for")
    x, y = calibration_arrays(data.train.batches(0), model, args.calibration_images, args.calibration)
    suffix = ".int8.onnx" if args.format == "onnx" else ".int8.safetensors"
    if args.out:
        out = Path(args.out)
    elif args.weights:
        out = Path(info["weights"] + suffix)
    else:
        out = Path(args.checkpoint).with_name(Path(args.checkpoint).name.split(".")[0] + suffix)
    if args.format == "onnx":
        r = quantize_model(model, info, x, y, out, image_size=size, name=info.get("model"))
    else:
        if out.suffix.lower() != ".safetensors":
            raise ConfigError(f"an int8 model for PyTorch is a .safetensors file: --out {out} should end in .int8.safetensors "
                              "(or add --format onnx for an ONNX Runtime model)")
        r = write_int8(model.cpu(), {**info, "image_size": size}, torch.from_numpy(x), torch.from_numpy(y), out)
    accuracy = (f"; top-1 accuracy there {100 * r['int8_accuracy']:.2f}% against {100 * r['float32_accuracy']:.2f}% "
                "in float32" if "int8_accuracy" in r else "")
    print(f"wrote {out} (int8, {r['int8_bytes'] / 1e6:.2f} MB against {r['float32_bytes'] / 1e6:.2f} MB in float32); "
          f"on {r['calibration_images']} calibration images it agrees with float32 on "
          f"{100 * r['agreement']:.1f}% of top-1 classes{accuracy}")
    if r["agreement"] < AGREEMENT_WARNING:
        print(f"densenet export: the int8 model agrees with float32 on only {100 * r['agreement']:.1f}% of the calibration "
              f"images (below {100 * AGREEMENT_WARNING:.0f}%): it is not fit to serve. Calibrate on more images like "
              "those served, or serve the float32 model.", file=sys.stderr)
        return 1
    return 0


def cmd_reuse(args: argparse.Namespace) -> int:
    _check_out_folder(args.out)
    csv_path = args.csv or str(Path(args.out).with_suffix(".csv"))
    _check_out_folder(csv_path)
    model, info = model_from_checkpoint(args.checkpoint)
    blocks = feature_reuse(model)
    name = info.get("model") or "DenseNet"
    plot_reuse(args.out, blocks, title=f"Feature reuse in {name} ({info.get('dataset', '?')}): average |weight| from "
                                         "source s to target l, each column scaled to its maximum")
    write_reuse_csv(csv_path, blocks)
    print(f"wrote {args.out} ({len(blocks)} dense blocks) and {csv_path}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    runs = [load_run(d) for d in args.runs]
    records = table_records(runs, all_paper_rows=args.all)
    markdown = render_markdown(records)
    print(markdown, end="")
    for path, text in ((args.markdown, markdown), (args.csv, render_csv(records))):
        if path:
            _check_out_folder(path)
            atomic_write_text(path, text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    runs = [load_run(d, need_metrics=True) for d in args.runs]
    _check_out_folder(args.out)
    models = {r.model for r in runs}
    plot_curves(args.out, [(r.label, r.metrics) for r in runs],
                title="Learning curves: " + ", ".join(sorted(models)) + " (dotted verticals: learning-rate drops)")
    written = [args.out]
    if len(models) > 1:
        params_path = args.params_out or str(Path(args.out).with_name(Path(args.out).stem + "-params.png"))
        _check_out_folder(params_path)
        points = [(r.model, r.dataset, int(r.report["parameters"]), float(r.report["test_error"])) for r in runs]
        datasets = {r.dataset for r in runs}
        reference = [(m, d, model_spec(m).paper_params, e) for m, errors in TABLE2.items()
                     for d, e in zip(TABLE2_DATASETS, errors) if d in datasets and e is not None] if args.paper else []
        plot_efficiency(params_path, points, reference)
        written.append(params_path)
    else:
        print("one model only: no parameter-efficiency plot (give runs of several models)")
    print("wrote " + " and ".join(written))
    return 0


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
    return _count(text, 1)


def _non_negative(text: str) -> int:
    return _count(text, 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet", description="DenseNet models, training and analysis.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameters and multiply-adds")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="per-block structure of one model")
    p.add_argument("name", help="a registered name (see `densenet models`) or densenet_bc{L}_k{k} / densenet{L}_k{k}")
    p.add_argument("--input-size", type=_positive, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--num-classes", type=_non_negative, default=None,
                   help="outputs of the classifier (0: none; default: the model's)")
    p.add_argument("--spatial-dims", type=int, choices=(1, 2, 3), default=None,
                   help="1 (signals), 2 (images, the default) or 3 (volumes); --input-size is then the side of each axis")
    p.add_argument("--in-channels", type=_positive, default=None, help="input channels (default: the model's, 3)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model with the paper's recipe for a dataset",
                       description="Train one experiment end to end; with no other flag, the paper's recipe for the dataset.")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("weights", help="the trained weights available by name (this project's and torchvision's)")
    p.add_argument("model", nargs="?", help="only this model's")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("eval", help="errors, per-class metrics and the confusion matrix of a checkpoint on a test set",
                       description="Top-1 error (top-5 with more than 5 classes), balanced accuracy, per-class precision, "
                                   "recall and F1 and the confusion matrix, printed and written as "
                                   "confusion.csv, confusion.png and eval.json.")
    p.add_argument("checkpoint", nargs="?", help="densenet train's checkpoint (or use --weights)")
    add_weights_flags(p)
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data", help="dataset directory or archive, or a label file for --dataset csv (default: the bundled "
                                  "sample)")
    p.add_argument("--image-root", help="dataset csv: the folder the label file's image paths are relative to (default: "
                                        "the label file's folder)")
    p.add_argument("--out", metavar="DIR", help="folder for confusion.csv, confusion.png and eval.json (default: "
                                                "eval-DATASET beside the checkpoint; with --weights, only when given)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--workers", type=_non_negative, default=2)
    p.add_argument("--device", default="auto")
    add_tta_flag(p, "its errors are printed and written to eval.json")
    add_ema_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes of images (files or folders) with probabilities")
    p.add_argument("checkpoint", nargs="?", metavar="MODEL",
                   help="a checkpoint, or an export: .onnx (run by ONNX Runtime), .pt2 (torch.export) or .safetensors "
                        "(or use --weights)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders (searched recursively)")
    add_weights_flags(p)
    p.add_argument("--top", type=_positive, default=5)
    p.add_argument("--csv", help="also write the predictions to this CSV file")
    p.add_argument("--image-size", type=_positive, help="side in pixels the images are resized to (default: the model's)")
    p.add_argument("--skip-bad", action="store_true",
                   help="name and skip images that cannot be decoded or hold NaN/infinite values (default: stop)")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="each image's folder is its true class (<class>/<image>, as in the training data): also print "
                        "the accuracy, the confusion matrix and per-class metrics")
    add_tta_flag(p, "each image's top classes are printed (and written to --csv)")
    add_ema_flag(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="class activation maps of images: an overlay PNG and the raw map per image",
                       description="Where the model sees a class in each image (CAM by default; Grad-CAM, Grad-CAM++, "
                                   "Score-CAM, Eigen-CAM with the grad-cam package): OUT/<image>.png (the image, its heat "
                                   "map, the top classes) and OUT/<image>.npy (the map, float32 in [0, 1]).")
    p.add_argument("source", metavar="WEIGHTS_OR_CHECKPOINT",
                   help="a checkpoint, a safetensors export, or trained weights by name (MODEL.TAG; see densenet weights)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the overlays and maps (created)")
    p.add_argument("--method", choices=METHODS, default="cam",
                   help="default cam (needs nothing more; the others need grad-cam: pip install 'densenet[explain]')")
    p.add_argument("--class", dest="target", metavar="CLASS",
                   help="the class to explain, an index or a name (default: each image's top prediction)")
    p.add_argument("--layer", help="the module the Grad-CAM family looks at (default: the last dense block)")
    p.add_argument("--top", type=_positive, default=3, help="classes shown with their probabilities (default 3)")
    p.add_argument("--csv", help="also write the predictions and file names to this CSV file")
    p.add_argument("--image-size", type=_positive, help="side in pixels the images are resized to (default: the model's)")
    p.add_argument("--skip-bad", action="store_true", help="name and skip images that cannot be decoded (default: stop)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="write a checkpoint's model as ONNX, a torch.export program, TorchScript or "
                                      "safetensors for serving",
                       description="Export the model of a checkpoint (standard graph, eval mode, dynamic batch size) "
                                   "and check the file's outputs against PyTorch's (within 1e-4). For PyTorch serving "
                                   "prefer --format export (torch.export, .pt2); TorchScript is deprecated upstream "
                                   "(torch 2.14) and kept while torch supports it.")
    p.add_argument("checkpoint", nargs="?", help="densenet train's checkpoint (or use --weights)")
    add_weights_flags(p)
    p.add_argument("--format", choices=FORMATS,
                   help="onnx (ONNX Runtime), export (torch.export program, .pt2), torchscript, safetensors (+ JSON); "
                        "required without --int8")
    p.add_argument("--out", help="output file (default: beside the checkpoint, checkpoint.onnx / checkpoint.pt2 / "
                                 "checkpoint.torchscript.pt / checkpoint.safetensors + checkpoint.json)")
    p.add_argument("--image-size", type=_positive, help="input side in pixels (default: the training image size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--int8", action="store_true",
                   help="an int8 model calibrated on --calibration's images: for PyTorch's int8 convolutions "
                        "(CHECKPOINT.int8.safetensors; the fastest on x86 CPUs) or, with --format onnx, for ONNX Runtime "
                        "(QDQ, CHECKPOINT.int8.onnx); eval and predict take either file")
    p.add_argument("--calibration", metavar="DATA", help="--int8's calibration images: a folder, zip or archive read as "
                   "the model's training dataset (or --calibration-dataset), or 'sample'")
    p.add_argument("--calibration-dataset", metavar="NAME", help="how to read --calibration (default: the model's training "
                   "dataset without augmentation; 'folder' for <class>/<image> trees)")
    p.add_argument("--calibration-images", type=_positive, default=512,
                   help="images from --calibration's training split to calibrate on (default 512)")
    add_ema_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reuse", help="feature-reuse heat maps of a checkpoint (the paper's Figure 5)",
                       description="One heat map per dense block: pixel (s, l) is the average absolute weight of "
                                   "target l's first convolution over the maps from source s (0: block input), each "
                                   "column scaled to its maximum; the last column is the transition (or classifier).")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--csv", help="raw values as CSV (default: the PNG's name with .csv)")
    p.set_defaults(func=cmd_reuse)

    p = sub.add_parser("table", help="run reports in the paper's Table 2 / Table 3 layout, beside the paper's numbers")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--markdown", help="also write the Markdown to this file")
    p.add_argument("--csv", help="write the table as CSV to this file")
    p.add_argument("--all", action="store_true", help="include the paper's rows that have no run")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("plot", help="overlaid learning curves of runs, and parameter efficiency across models")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="PNG of training loss and test error against epoch")
    p.add_argument("--params-out", help="PNG of test error against parameters (default: OUT-params.png; "
                                        "written when the runs span several models)")
    p.add_argument("--no-paper", dest="paper", action="store_false",
                   help="leave the paper's Table 2 points out of the parameter-efficiency plot")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``densenet`` command. This project's own errors (bad input, files, configurations)
    are one line on stderr and exit code 2 (``DENSENET_DEBUG=1`` shows their traceback); anything
    else is a bug: its traceback is shown with a request to report it, exit code 1."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # whoever read the output has gone (`densenet models | head -3`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except TrainingStopped as e:
        print(f"densenet {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except DenseNetError as e:
        if os.environ.get("DENSENET_DEBUG"):
            raise
        print(f"densenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: show where, and ask for a report
        traceback.print_exc()
        print(f"densenet {args.command}: internal error (a bug in densenet, not in your input); please report it "
              "to the densenet maintainers with the traceback above and the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
