"""The CPU training levers of the speed issue, one at a time, on this project's default step
(DenseNet-BC-100 k=12, batch 64, 32x32, bf16 autocast + channels_last, SGD with Nesterov momentum;
``--fp32`` for float32, the precision of a CPU without bfloat16 instructions; ``--model`` another model).

Each lever runs in a fresh process (environment variables and preloaded allocators act at process
start); the processes take turns within every repeat and each reports the median step time of its
timed steps, so a lever is compared with the baseline measured beside it.

    python bench/bench_levers.py                  # baseline, THP, jemalloc, tcmalloc, foreach SGD, 1 thread
    python bench/bench_levers.py --compile        # + torch.compile of the model (minutes to compile)
    python bench/bench_levers.py --fp32 --only "hand,freed"   # float32: the AVX2 kernels, malloc keeping memory

Allocators come from Debian's packages (apt-get install libjemalloc2 libtcmalloc-minimal4); a
missing one is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet import create_model  # noqa: E402
from densenet.training import allocator  # noqa: E402

ALLOCATORS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
              "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
LEVERS = {  # name: (environment additions, child options)
    "baseline": ({}, []),
    "fused kernels off (DENSENET_FUSED=0)": ({"DENSENET_FUSED": "0"}, []),
    "hand kernels off (DENSENET_CPU_KERNELS=0)": ({"DENSENET_CPU_KERNELS": "0"}, []),
    "freed memory kept (mallopt)": ({}, ["--keep-freed-memory"]),
    "THP_MEM_ALLOC_ENABLE=1": ({"THP_MEM_ALLOC_ENABLE": "1"}, []),
    "jemalloc": ({"LD_PRELOAD": ALLOCATORS["jemalloc"]}, []),
    "tcmalloc": ({"LD_PRELOAD": ALLOCATORS["tcmalloc"]}, []),
    "SGD foreach": ({}, ["--foreach"]),
    "1 thread": ({}, ["--threads", "1"]),
    "float32 (no autocast)": ({}, ["--fp32"]),
}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(memory_format=torch.channels_last).train()
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True,
                          foreach=args.foreach or None)
    t0 = time.perf_counter()
    if args.compile:
        model = torch.compile(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()
    first = time.perf_counter() - t0
    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"step_s": statistics.median(times), "first_s": first, "peak_bytes": peak}))


def run_lever(env: dict, options: list[str], steps: int, common: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), *common, *options]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--foreach", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp32", action="store_true", help="float32 steps (no autocast) for every lever")
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--only", help="comma-separated parts of lever names: those levers (and the baseline) alone")
    p.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    levers = dict(LEVERS)
    for name, path in ALLOCATORS.items():
        if not Path(path).exists():
            print(f"note: {name} skipped ({path} missing: apt-get install libjemalloc2 libtcmalloc-minimal4)")
            levers.pop(name)
    if args.compile:
        levers["torch.compile"] = ({}, ["--compile"])
    if args.fp32:
        levers.pop("float32 (no autocast)")
    if args.only:
        levers = {k: v for k, v in levers.items() if k == "baseline" or any(w in k for w in args.only.split(","))}
    common = ["--model", args.model] + (["--fp32"] if args.fp32 else [])
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {args.model} batch 64 training step, "
          f"{'float32' if args.fp32 else 'bf16 autocast unless said'}; median of {args.repeats} processes x "
          f"{args.steps} steps each; peak resident memory of the last process")
    results: dict[str, list[float]] = {k: [] for k in levers}
    firsts: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, (env, options) in levers.items():
            r = run_lever(env, options, args.steps, common)
            if "error" in r:
                print(f"  {name}: failed: {r['error']}")
                continue
            results[name].append(r["step_s"])
            firsts[name], peaks[name] = r["first_s"], r["peak_bytes"]
    base = statistics.median(results["baseline"])
    for name, times in results.items():
        if times:
            s = statistics.median(times)
            extra = f", first step (compile) {firsts[name]:.0f} s" if name == "torch.compile" else ""
            print(f"  {name:42s} {64 / s:7.1f} img/s  {base / s:5.2f}x baseline  {peaks[name] / 2**30:5.2f} GiB{extra}")


if __name__ == "__main__":
    main()
