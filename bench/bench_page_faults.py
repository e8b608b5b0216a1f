"""What a fresh tensor costs on this machine: filling a newly allocated tensor against refilling one
that is reused, for the sizes a BC-100 training step allocates (batch 64).

On a VM the first touch of each fresh page is a page fault that can cost more than the arithmetic.
Tensors above glibc's mmap threshold (32 MiB at most) are mapped fresh on every allocation and
unmapped on free, so every large temporary pays this. It is why the shared-buffer blocks reuse
workspaces, and why torchvision's speed here depends on the machine's state.

    python bench/bench_page_faults.py
"""
from __future__ import annotations

import datetime
import statistics
import time

import torch


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, 2 threads")
    cases = {  # what: number of float32 values
        "block-1 buffer of BC-100 (64 x 216 x 32 x 32), 56.6 MB": 64 * 216 * 32 * 32,
        "bottleneck output (64 x 48 x 32 x 32), 12.6 MB": 64 * 48 * 32 * 32,
        "new maps of one layer (64 x 12 x 32 x 32), 3.1 MB": 64 * 12 * 32 * 32,
    }
    for what, numel in cases.items():
        reused = torch.empty(numel)
        fresh = median_ms(lambda n=numel: torch.empty(n).fill_(1.0))
        again = median_ms(lambda t=reused: t.fill_(1.0))
        print(f"{what}: fresh {fresh:6.2f} ms, reused {again:6.2f} ms, ratio {fresh / again:5.1f}x")


if __name__ == "__main__":
    main()
