"""What data loading costs a CIFAR-10 training run: SGD steps fed by the real loader against the
same steps fed by batches already in memory, alternating, in one run; beside them, torchvision's
float32 model fed by the in-memory batches (issue 23's reference: the epoch rate of `densenet train`
with its defaults against torchvision's float32 step rate).

Real: the shared CIFAR-10 JPEG copy through ``densenet.data.build_data("cifar10+")`` (decoded once
into the cache, then per batch: shuffling, 4-pixel pad + random crop + flip, normalisation, in the
loader's background thread), exactly what ``densenet train`` iterates. Synthetic: 8 batches of the
same shape made before timing, cycled. Both run the step of ``densenet train`` (forward,
cross-entropy, backward, SGD with Nesterov momentum, the loss read back).

    python bench/bench_end_to_end.py [--model densenet_bc100_k12] [--steps 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_speed import torchvision_model  # noqa: E402  (this folder)

from densenet import create_model  # noqa: E402
from densenet.data import build_data  # noqa: E402
from densenet.training.precision import resolve_amp  # noqa: E402

ZIP = Path(os.environ.get("DENSENET_CIFAR10_ZIP", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="auto", help="auto (what densenet train does: bf16 on a CPU with AMX/AVX512_BF16) or off")
    p.add_argument("--channels-last", action="store_true", help="as densenet train --channels-last (off by default there too)")
    args = p.parse_args()
    bf16 = resolve_amp(args.amp, torch.device("cpu")) == "bf16"
    torch.set_num_threads(args.threads)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}, {platform.node()}, torch {torch.__version__}, "
          f"{args.threads} threads; command: python {' '.join(sys.argv)}")

    t0 = time.perf_counter()
    data = build_data("cifar10+", ZIP, batch_size=args.batch_size)
    print(f"data ready in {time.perf_counter() - t0:.1f} s ({data.train.num_images} training images, {data.source})")
    model = create_model(args.model, num_classes=10)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)  # as densenet train
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    tv = torchvision_model(args.model).train()
    tv_opt = torch.optim.SGD(tv.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images.contiguous(memory_format=fmt)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())

    def tv_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(tv(images), labels)
        tv_opt.zero_grad(set_to_none=True)
        loss.backward()
        tv_opt.step()
        float(loss.detach())

    g = torch.Generator().manual_seed(0)
    synthetic = [(torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g))
                 for _ in range(8)]
    real_batches = data.train.batches(0)  # one epoch of real batches, consumed block by block
    synthetic_cycle = itertools.cycle(synthetic)

    def block(source, fn=step) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            fn(*next(source))
        return args.batch_size * args.steps / (time.perf_counter() - t)

    block(synthetic_cycle)  # warm-up: allocations, oneDNN kernels, the fused kernels' compilation
    block(real_batches)
    block(synthetic_cycle, tv_step)
    rates: dict[str, list[float]] = {"synthetic": [], "real": [], "tv": []}
    for _ in range(args.repeats):
        rates["synthetic"].append(block(synthetic_cycle))
        rates["real"].append(block(real_batches))
        rates["tv"].append(block(synthetic_cycle, tv_step))
    med = {k: statistics.median(v) for k, v in rates.items()}
    loss = 1 - med["real"] / med["synthetic"]
    precision = "bf16 autocast" if bf16 else "float32"
    layout = "channels_last, " if args.channels_last else ""
    print(f"{args.model}, {precision}, {layout}batch {args.batch_size}, "
          f"{args.repeats} alternating blocks of {args.steps} steps (median):")
    print(f"  synthetic in-memory batches: {med['synthetic']:.1f} img/s   "
          f"(all: {', '.join(f'{r:.1f}' for r in rates['synthetic'])})")
    print(f"  real CIFAR-10 loader:        {med['real']:.1f} img/s   (all: {', '.join(f'{r:.1f}' for r in rates['real'])})")
    print(f"  torchvision float32, in-memory: {med['tv']:.1f} img/s   (all: {', '.join(f'{r:.1f}' for r in rates['tv'])})")
    print(f"  lost to data loading: {100 * loss:.1f}%; real loader against torchvision float32: "
          f"{med['real'] / med['tv']:.2f}x")


if __name__ == "__main__":
    main()
