"""Throughput of augmented, normalised CIFAR-10 training batches (the "cifar10+" data path).

    python bench/bench_data.py [--root ../shared/data/cifar10-jpeg.zip] [--epochs 3] [--batch-size 64]

Imports the CIFAR-10 JPEG zip into the cache once (timed separately), then iterates whole training
epochs of ``data.train.batches(epoch)`` — shuffle, gather, pad/crop/flip, normalise — and prints
images per second. Nothing else is computed, so this is the rate at which training can be fed.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from densenet.data import build_data

DEFAULT_ROOT = os.environ.get("DENSENET_CIFAR10_ZIP") or str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead in a thread (0: none)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()

    t0 = time.perf_counter()
    data = build_data("cifar10+", args.root, batch_size=args.batch_size, cache_dir=args.cache_dir, prefetch=args.prefetch)
    print(f"build_data (import into the cache on first use): {time.perf_counter() - t0:.2f} s; source {data.source}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rates = []
    for epoch in range(args.epochs):
        t = time.perf_counter()
        n = 0
        for x, y in data.train.batches(epoch):  # noqa: B007 - the last x is described below
            n += len(y)
        dt = time.perf_counter() - t
        rates.append(n / dt)
        print(f"epoch {epoch}: {n} images in {dt:.2f} s = {n / dt:,.0f} images/s")
    print(f"median: {sorted(rates)[len(rates) // 2]:,.0f} images/s (batches of {args.batch_size}, {x.dtype} {tuple(x.shape)})")


if __name__ == "__main__":
    main()
