"""Any few of bench_speed's training configurations, alternating in one process (medians), for an A/B
of one lever without the rest of the full bench: for example the fused CPU kernels on and off.

    python bench/bench_alternate.py ours_bf,ours_unfused_bf                 # the fused kernels alone
    python bench/bench_alternate.py tv,tv_bf,ours_bf,ours_unfused_bf --repeats 5
    python bench/bench_alternate.py ours_bf,ours_me_bf                      # memory-efficient against the default
    python bench/bench_alternate.py tv,tv_bf,ours,ours_bf --processes       # a process per configuration
    python bench/bench_alternate.py tv,ours,ours_unfused --fused-float32    # the fused kernels in float32
    python bench/bench_alternate.py tv,tv+keep,ours,ours+keep --processes  # + malloc keeping freed memory

Configurations: bench_speed's names (tv, tv_bf, ours, ours_bf, ours_unfused_bf, ours_me_bf, ...);
BC-100 k=12, batch 64; images at the model's input size (32x32 for the CIFAR models, 224x224 for the
ImageNet ones) unless --size says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as b  # noqa: E402  (this folder: the same models, steps and timing)

from densenet.models import model_spec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("impls", help="comma-separated configurations")
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, help="image side (default: the model's input size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", action="store_true", help="each configuration in its own process, taking turns")
    p.add_argument("--fused-float32", action="store_true",
                   help="also compile the fused kernels for float32 (by default they serve bf16/fp16 only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.fused_float32:
        b.fused.COMPILED_DTYPES = (torch.float32, *b.fused.COMPILED_DTYPES)
    impls = args.impls.split(",")
    size = args.size or model_spec(args.model).input_size
    if args.processes:
        sec = b.timed_in_processes(impls, args.model, size, args.batch, args.repeats, args.warmup, args.threads)
    else:
        x, y = b.data(args.model, size, args.batch)
        sec = b.timed_alternating(b.train_steps(impls, args.model, x, y), args.repeats, warmup=args.warmup)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.model} batch {args.batch}, {size}x{size}, median of {args.repeats} alternating steps"
          f"{' (a process each)' if args.processes else ''}; ours: {b.fused.status()}")
    for i, s in sec.items():
        print(f"  {i:16s} {args.batch / s:7.2f} img/s   {sec[impls[0]] / s:5.2f}x {impls[0]}")


if __name__ == "__main__":
    main()
