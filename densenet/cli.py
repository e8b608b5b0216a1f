"""The ``densenet`` command: ``densenet models``, ``info``, ``train``, ``eval``, ``predict``, ``export``,
``reuse``, ``table``, ``plot``."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

from .registry import create_model, list_models, model_spec
from .reports import markdown_table as _table
from .summary import count_macs, count_parameters, stage_summary


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
    print(_table(["name", "depth", "k", "layout", "parameters", "paper", "input", "GMACs"], rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    spec = model_spec(args.name)
    with torch.device("meta"):
        model = create_model(args.name, num_classes=args.num_classes or spec.kwargs["num_classes"])
    size = args.input_size or spec.input_size
    model.check_input_size(size)
    print(f"{args.name}: {model.extra_repr()}")
    print(f"parameters: {count_parameters(model):,}; multiply-adds at {size}x{size}: "
          f"{count_macs(model, size) / 1e9:.3f} G\n")
    rows = [[s.name, s.in_channels, s.out_channels, f"{s.size}x{s.size}", f"{s.params:,}"]
            for s in stage_summary(model, size)]
    print(_table(["stage", "in", "out", "output size", "parameters"], rows))
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--no-nesterov``, ...); absent flags leave
    the recipe's value, so only what the user typed overrides it."""
    import dataclasses

    from .config import TrainConfig

    help_text = {
        "model": "registered name or densenet_bc{L}_k{k} (default densenet_bc100_k12)",
        "dataset": "cifar10, cifar10+, cifar100, cifar100+, svhn, imagenet or folder (default cifar10+)",
        "data": "dataset directory or archive (default: the bundled CIFAR-10 sample)",
        "out": "run directory", "epochs": "default: the paper's (300 CIFAR, 40 SVHN, 90 ImageNet)",
        "lr_milestones": "epochs at which lr is divided by 10 (default: 50%% and 75%% of the epochs; 30 60 for ImageNet)",
        "drop_rate": "default 0.2 without augmentation (cifar10, cifar100, svhn), else 0",
        "val_size": "training images held out for validation (paper: 5000 CIFAR, 6000 SVHN); default none",
        "train_subset": "train on this many training images, chosen by the seed",
        "test_subset": "evaluate on this many test images, chosen by the seed",
        "init": "start from this project's checkpoint or a torchvision DenseNet state dict",
        "freeze_features": "train the classifier only",
        "download": "download missing official CIFAR/SVHN files (MD5-checked); needs internet",
        "image_size": "image side in pixels for folder datasets (default 224)",
        "deterministic": "deterministic algorithms (bit-identical reruns and resumes)",
        "device": "auto (CUDA when present), cpu, cuda, cuda:N", "threads": "CPU threads",
        "workers": "data-loading worker processes (image folders)",
        "checkpoint_every": "steps between mid-epoch checkpoints (0: epoch ends only)",
        "quiet": "no progress bar: one line per epoch, for log files",
        "sync_bn": "synchronised BN over all processes (distributed training; matters for small per-process batches)",
        "amp": "mixed precision: off, bf16, or fp16 (CUDA only, with a gradient scaler)",
        "channels_last": "NHWC memory format for the model and its inputs (faster convolutions on GPUs)",
        "dist_backend": "under torchrun: auto (nccl on CUDA, else gloo), nccl or gloo",
        "dist_timeout": "seconds a collective waits for a peer process before the run stops (default 600)",
        "memory_check": "refuse to start when a step's estimated memory clearly exceeds the available memory (default on)",
    }
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.get(f.name)}
        t = str(f.type)
        if t == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t.startswith("list"):
            p.add_argument(flag, type=int, nargs="*", metavar="EPOCH", **kw)
        else:
            base = t.split(" | ")[0]
            p.add_argument(flag, type={"int": int, "float": float}.get(base, str), metavar=base.upper(), **kw)
    p.add_argument("--config", help="YAML file of the same keys (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in an --out directory that holds another run")


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import resolve_config
    from .train import TrainingStopped, load_run_config, train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "force")}
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the configuration of the run it continues; drop --config")
        config = load_run_config(Path(args.resume), overrides)
    else:
        config = resolve_config(overrides, args.config)
    try:
        train(config, resume=bool(args.resume), force=args.force)
    except TrainingStopped as e:
        print(f"densenet train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_data
    from .evaluate import evaluate, model_from_checkpoint
    from .train import resolve_device

    model, info = model_from_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    dataset = args.dataset or info["dataset"]
    data = build_data(dataset, args.data, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                      workers=args.workers, image_size=info["image_size"])
    if data.num_classes != model.num_classes:
        raise ValueError(f"{dataset} has {data.num_classes} classes but the checkpoint's model has {model.num_classes}")
    result = evaluate(model, data.test.batches(0), device)
    print(f"{dataset} test set, {result['images']} images: top-1 error {result['top1_error']:.2f}%, "
          f"top-5 error {result['top5_error']:.2f}%")
    if dataset == "imagenet":
        crops = evaluate(model, data.test.batches(0, ten_crop=True), device)
        print(f"10-crop: top-1 error {crops['top1_error']:.2f}%, top-5 error {crops['top5_error']:.2f}%")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from .atomic import atomic_write_text
    from .evaluate import load_predictor, predict_images

    model, info = load_predictor(args.model, args.image_size)
    skipped = []

    def skip(path, error: Exception) -> None:
        print(f"densenet predict: skipped {error}", file=sys.stderr)
        skipped.append(path)

    rows = []
    for path, top in predict_images(model, args.images, info, top=args.top, on_error=skip if args.skip_bad else None):
        print(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))
        rows.append([str(path)] + [x for name, p in top for x in (name, f"{p:.6f}")])
    if not rows:
        raise ValueError(f"no image could be scored in {', '.join(args.images)}"
                         + (f" ({len(skipped)} skipped)" if skipped else " (no image files found)"))
    if args.csv:
        _check_out_folder(args.csv)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image"] + [f"{c}{i + 1}" for i in range(args.top) for c in ("class", "prob")])
        writer.writerows(rows)
        atomic_write_text(args.csv, buffer.getvalue())
    return 0


def _check_out_folder(path: str) -> None:
    from pathlib import Path

    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, args.format, image_size=args.image_size, opset=args.opset)
    files = ", ".join(map(str, result["files"]))
    print(f"wrote {files} ({args.format}; outputs within {result['max_abs_diff']:.1e} of PyTorch on a test batch)")
    return 0


def cmd_reuse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import model_from_checkpoint
    from .reuse import feature_reuse, plot_reuse, write_reuse_csv

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
    from .atomic import atomic_write_text
    from .reports import load_run, render_csv, render_markdown, table_records

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
    from pathlib import Path

    from .curves import plot_curves, plot_efficiency
    from .paper import TABLE2, TABLE2_DATASETS
    from .registry import model_spec
    from .reports import load_run

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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet", description="DenseNet models, training and analysis.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameters and multiply-adds")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="per-block structure of one model")
    p.add_argument("name", help="a registered name (see `densenet models`) or densenet_bc{L}_k{k} / densenet{L}_k{k}")
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model with the paper's recipe for a dataset",
                       description="Train one experiment end to end; with no other flag, the paper's recipe for the dataset.")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 and top-5 error of a checkpoint on a dataset's test set")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data", help="dataset directory or archive (default: the bundled sample)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes of images (files or folders) with probabilities")
    p.add_argument("model", metavar="MODEL", help="a checkpoint, or an export: .onnx (run by ONNX Runtime) or .safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--top", type=_positive, default=5)
    p.add_argument("--csv", help="also write the predictions to this CSV file")
    p.add_argument("--image-size", type=_positive, help="side in pixels the images are resized to (default: the model's)")
    p.add_argument("--skip-bad", action="store_true",
                   help="name and skip images that cannot be decoded or hold NaN/infinite values (default: stop)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a checkpoint's model as ONNX, TorchScript or safetensors for serving",
                       description="Export the model of a checkpoint (standard graph, eval mode, dynamic batch size) "
                                   "and check the file's outputs against PyTorch's (within 1e-4).")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"))
    p.add_argument("--out", help="output file (default: beside the checkpoint, checkpoint.onnx / "
                                 "checkpoint.torchscript.pt / checkpoint.safetensors + checkpoint.json)")
    p.add_argument("--image-size", type=_positive, help="input side in pixels (default: the training image size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
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
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("DENSENET_DEBUG"):
            raise
        print(f"densenet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
