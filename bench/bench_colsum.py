"""Column sums of an (M, C) bfloat16 matrix on this CPU: why the fused kernels sum rows in two stages.

TorchInductor's CPU code for ``x.float().sum(0)`` (one reduction over all M rows) ran 3-7x slower
than a copy of the same bytes on the 2-core Xeon of 2026-12-06; summing blocks of 256 rows first and
then the blocks (``densenet.models.fused._sum_rows``) runs at about the copy's speed. Eager
``x.sum(0)`` and a matrix-vector product with a vector of ones are shown beside. The forms alternate
within every repeat; medians in milliseconds.

    python bench/bench_colsum.py
    python bench/bench_colsum.py --rows 16384 --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from densenet.models import fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536, help="M: batch x positions (BC-100's first block at batch 64)")
    p.add_argument("--widths", default="12,48,120,216", help="C values, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(2)
    one = torch.compile(lambda x: x.float().sum(0), dynamic=True)
    two = torch.compile(lambda x: fused._sum_rows(x.float()), dynamic=True)
    print(f"# {time.strftime('%Y-%m-%dT%H:%M')}, torch {torch.__version__}, M={args.rows} bf16 rows, "
          f"median of {args.repeats}, ms")
    print(f"{'C':>5} {'MB':>6} {'copy':>7} {'eager':>7} {'ones@x':>7} {'1-stage':>8} {'2-stage':>8} {'1/2':>6}")
    for c in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.rows, c).to(torch.bfloat16)
        ones = torch.ones(1, args.rows, dtype=torch.bfloat16)
        forms = {"copy": lambda x, ones: x.clone(), "eager": lambda x, ones: x.sum(0), "ones@x": lambda x, ones: ones @ x,
                 "1-stage": lambda x, ones: one(x), "2-stage": lambda x, ones: two(x)}
        torch.testing.assert_close(one(x), two(x), rtol=1e-4, atol=1e-2)
        times: dict[str, list[float]] = {k: [] for k in forms}
        with torch.no_grad():
            for f in forms.values():
                f(x, ones), f(x, ones)
            for _ in range(args.repeats):
                for k, f in forms.items():
                    t = time.perf_counter()
                    for _ in range(5):
                        f(x, ones)
                    times[k].append((time.perf_counter() - t) / 5 * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{c:5d} {x.numel() * 2 / 1e6:6.1f} " + " ".join(f"{med[k]:7.2f}" for k in ("copy", "eager", "ones@x"))
              + f" {med['1-stage']:8.2f} {med['2-stage']:8.2f} {med['1-stage'] / med['2-stage']:5.1f}x")


if __name__ == "__main__":
    main()
