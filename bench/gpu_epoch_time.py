"""Training and evaluation throughput of the paper's models on one GPU, for the time estimates in
docs/REPRODUCING.md.

Synthetic batches already on the GPU (no data loading), the project's model and the step of
``densenet train`` (SGD with Nesterov momentum, cross-entropy), the paper's batch sizes (64 for
CIFAR/SVHN at 32x32, 256 for ImageNet at 224x224) and the evaluation batch of 256. Two settings:
the default fp32 run (cuDNN may use TF32 for convolutions, PyTorch's default) and ``--amp bf16
--channels-last``. Prints one JSON line per model and writes them to $OUT/gpu_epoch_time.json.

    python bench/gpu_epoch_time.py [--steps 20] [--budget 300] [--models NAME ...] [--drop-rate 0.2] [--fp32-only]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet import create_model
from densenet.analysis.paper import TABLE2, TABLE3


def timed(fn, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(name: str, amp: bool, steps: int, drop_rate: float = 0.0) -> dict:
    imagenet = name in TABLE3
    batch, size, classes = (256, 224, 1000) if imagenet else (64, 32, 10)
    fmt = torch.channels_last if amp else torch.contiguous_format
    model = create_model(name, num_classes=classes, drop_rate=drop_rate).cuda().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device="cuda")
    xe = torch.randn(256, 3, size, size, device="cuda").contiguous(memory_format=fmt)

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            model(xe)

    model.train()
    train_s = timed(train_step, steps, warmup=3)
    model.eval()
    eval_s = timed(eval_step, max(3, steps // 2), warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": name, "setting": "bf16+channels_last" if amp else "fp32", "batch": batch, "size": size,
            "train_images_per_s": round(batch / train_s, 1), "eval_images_per_s": round(256 / eval_s, 1),
            "peak_gib": round(peak, 2), "drop_rate": drop_rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=300, help="seconds; models left when it runs out are skipped")
    parser.add_argument("--models", nargs="*", help="default: every model of Tables 2 and 3")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="0.2: the recipe without augmentation (C10, C100, SVHN)")
    parser.add_argument("--fp32-only", action="store_true")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True  # as densenet train on CUDA
    start = time.perf_counter()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(info), flush=True)
    results = []
    for name in args.models or list(TABLE2) + list(TABLE3):
        for amp in (False,) if args.fp32_only else (False, True):
            if time.perf_counter() - start > args.budget:
                print(json.dumps({"model": name, "skipped": "budget"}), flush=True)
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                r = measure(name, amp, args.steps, args.drop_rate)
            except Exception as e:  # noqa: BLE001 - report and go on with the next model
                r = {"model": name, "setting": "bf16+channels_last" if amp else "fp32", "error": f"{type(e).__name__}: {e}"[:500]}
            results.append(r)
            print(json.dumps(r), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"gpu_epoch_time_drop{args.drop_rate}.json").write_text(
            json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
