"""Ship a finished training run as weights inside the package (``densenet/assets/weights``).

    python tools/package_weights.py docs/runs/cifar10-bc40-k12-cpu --tag cifar10 \
        --data ../shared/data/cifar10-jpeg.zip --note "CIFAR-10 JPEG q75 copy (not the original PNG-exact test set)"

Measures the run's model on the dataset's whole test set (as ``densenet eval`` does; with ``--tta
flip`` also flip-averaged, beside the single-crop figure), then writes ``<model>-<tag>.safetensors``
(float16 storage with ``--half`` when that leaves every test prediction unchanged) and its entry in
``index.json``: SHA-256, size, accuracy with the command, machine and date, the recipe (the run's
``config.yaml``), and in ``extra`` the epochs, which weights (raw or the run's average) and the
run's hours from its ``metrics.csv``. ``densenet.list_weights()`` reads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from densenet.analysis import Run, load_run
from densenet.cli import add_ema_flag, ema_choice
from densenet.data import build_data
from densenet.io.atomic import atomic_write_bytes, atomic_write_text
from densenet.models.pretrained import BUNDLED_DIR
from densenet.serving import model_from_checkpoint
from densenet.serving.tta import TTA_MODES
from densenet.training import evaluate, evaluate_tta


def measure(model: torch.nn.Module, data, tta: str | None = None,
            predictions: bool = True) -> tuple[dict[str, float], torch.Tensor | None]:
    """Top-1 / top-5 accuracy (%) on the whole test set (and ``top1_<tta>``, ``top5_<tta>`` with test-time
    augmentation), and the single-crop top-1 predictions (None unless ``predictions``: another pass)."""
    device = torch.device("cpu")
    if tta:
        counts, averaged = evaluate_tta(model, data.test.batches(0), device, tta)
    else:
        counts, averaged = evaluate(model, data.test.batches(0), device), None
    preds = None
    if predictions:
        with torch.no_grad():
            preds = torch.cat([model(x).argmax(1) for x, _ in data.test.batches(0)])
    accuracy = {"top1": round(100 - counts.top1_error, 2), "top5": round(100 - counts.top5_error, 2),
                "images": counts.images}
    if averaged is not None:
        accuracy.update({f"top1_{tta}": round(100 - averaged.top1_error, 2),
                         f"top5_{tta}": round(100 - averaged.top5_error, 2)})
    return accuracy, preds


def run_hours(run: Run) -> dict[str, float]:
    """Wall-clock hours of the run's training steps and of its per-epoch evaluations, summed over the
    epochs of its ``metrics.csv``."""
    return {name: round(sum(r.get(key) or 0 for r in run.metrics) / 3600, 4)
            for key, name in (("seconds", "training"), ("eval_seconds", "evaluation"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished `densenet train --out` folder")
    p.add_argument("--tag", required=True, help="the weights' tag, e.g. cifar10")
    p.add_argument("--data", required=True, help="the dataset the run trained on (its test split is measured)")
    p.add_argument("--note", default="", help="what a user should know (e.g. the data copy used)")
    p.add_argument("--half", action="store_true", help="store float16 if no test prediction changes")
    add_ema_flag(p)
    p.add_argument("--tta", choices=TTA_MODES, help="also measure flip-averaged accuracy (top1_flip, top5_flip)")
    p.add_argument("--out", type=Path, default=BUNDLED_DIR, help="folder of the weights and index.json")
    args = p.parse_args()

    model, info = model_from_checkpoint(args.run / "checkpoint.pt", ema=ema_choice(args))
    run = load_run(args.run)
    config = run.config
    data = build_data(info["dataset"], args.data, batch_size=256, eval_batch_size=256, workers=0)
    accuracy, preds = measure(model, data, args.tta, predictions=args.half)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # not views: --half reloads the model
    if args.half:
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
        half_accuracy, half_preds = measure(model, data, args.tta)
        if torch.equal(half_preds, preds):
            state, accuracy = half, half_accuracy  # the figures of the stored weights (top-5 may move)
        else:
            print(f"float16 changes {int((half_preds != preds).sum())} predictions: stored as float32")
    blob = safetensors_bytes(state, metadata={"model": config["model"], "tag": args.tag})
    file_name = f"{config['model']}-{args.tag}.safetensors"
    command = (f"python tools/package_weights.py {args.run} --tag {args.tag} --data {args.data}"
               + (" --half" if args.half else "") + (f" --ema {args.ema}" if args.ema != "auto" else "")
               + (f" --tta {args.tta}" if args.tta else ""))
    recipe = "densenet train " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in config.items()
                                          if k in ("model", "dataset", "epochs", "recipe", "batch_size", "lr", "seed")
                                          and v is not None)
    entry = {
        "model": config["model"], "tag": args.tag, "dataset": info["dataset"], "class_names": list(info["class_names"]),
        "input_size": int(info["image_size"]), "mean": list(info["mean"]), "std": list(info["std"]),
        "accuracy": accuracy, "measured": f"{command} ({platform.machine()} CPU, torch {torch.__version__}, "
                                          f"{date.today().isoformat()})",
        "recipe": f"{recipe} (full configuration: {args.run}/config.yaml)", "file_name": file_name,
        "sha256": hashlib.sha256(blob).hexdigest(), "file_size": len(blob), "license": "MIT",
        "source": f"trained by this project: {args.run}", "url": None, "notes": args.note,
        "extra": {"epochs": config["epochs"], "weights": "average" if info.get("ema") else "raw",
                  "hours": run_hours(run)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / file_name, blob)
    index_path = args.out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else []
    index = [e for e in index if (e["model"], e["tag"]) != (entry["model"], entry["tag"])] + [entry]
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    flip = f" ({args.tta}-averaged: top-1 {accuracy[f'top1_{args.tta}']}%)" if args.tta else ""
    print(f"wrote {args.out / file_name} ({len(blob):,} bytes): top-1 {accuracy['top1']}%, top-5 {accuracy['top5']}% "
          f"on {accuracy['images']:,} test images{flip}")


if __name__ == "__main__":
    sys.exit(main())
