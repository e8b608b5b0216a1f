"""Where one DenseNet training step spends its time on this CPU, in float32 and under bf16 autocast.

For each precision: torch.profiler's self-CPU time per operator over two steps (after two warm-up
steps), grouped into what the step does (convolutions and matrix products, BN, ReLU, elementwise
arithmetic, reductions, copies and dtype conversions, pooling, the optimizer); the step's achieved
GFLOP/s against the 2048^3 matrix product's in the same dtype, measured in the same run; and, from a
child process run with ONEDNN_VERBOSE=1, which oneDNN kernels the convolutions and matrix products
ran on (``brg:avx512_core_amx`` means the AMX tiles, ``avx512_core_bf16`` the AVX512_BF16 dot
products) and how many reorders (layout conversions) a step makes.

    python bench/profile_step.py                       # BC-100 k=12, batch 64, 32x32
    python bench/profile_step.py --model densenet_bc40_k12 --markdown docs/profile.md
    python bench/profile_step.py --precision float32   # only float32 (a CPU without bfloat16 instructions)
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_speed import matmul_gflops, train_step_fn  # noqa: E402  (this folder: the same step and ceiling)

from densenet import create_model  # noqa: E402

GROUPS = [  # (group, operator-name patterns), first match wins
    ("convolution and matrix product", ("convolution", "mm", "addmm", "linear", "bmm", "matmul")),
    ("batch norm", ("batch_norm",)),
    ("ReLU", ("relu", "threshold", "clamp")),
    ("reductions (sums, means)", ("sum", "mean", "var")),
    ("copies and dtype conversions", ("copy_", "_to_copy", "contiguous", "clone", "cat")),
    ("pooling", ("pool",)),
    ("elementwise arithmetic", ("add", "sub", "mul", "div", "rsqrt", "pow", "addcmul", "neg")),
    ("allocation and fills", ("empty", "zero", "fill", "new_")),
]


def group_of(name: str) -> str:
    op = name.removeprefix("aten::")
    for group, keys in GROUPS:
        if any(op == k or op.startswith(k) or op.endswith(k) for k in keys):
            return group
    return "other"


def make_step(model_name: str, batch: int, bf16: bool):
    """One SGD step of ``model_name`` on a fixed channels_last batch (bench_speed's step)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return train_step_fn(model, x, torch.randint(0, 10, (batch,)), bf16)


def step_gflop(model_name: str) -> float:
    """FLOP of one training step per image: 3x the forward (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = create_model(model_name, num_classes=10, fast=False).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return 3 * counter.get_total_flops() / 1e9


def onednn_child(model_name: str, batch: int, bf16: bool) -> None:
    """Run in a child with ONEDNN_VERBOSE=1: warm up, then mark one step for the parent to parse."""
    step = make_step(model_name, batch, bf16)
    step()
    step()
    print("#STEP-BEGIN", flush=True)
    step()
    print("#STEP-END", flush=True)


def onednn_kernels(model_name: str, batch: int, bf16: bool) -> tuple[collections.Counter, collections.Counter]:
    """(primitive kind and kernel -> calls, primitive kind -> milliseconds) of one step, from ONEDNN_VERBOSE."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, __file__, "--onednn-child", model_name, str(batch), "bf16" if bf16 else "fp32"],
                         capture_output=True, text=True, env=env).stdout
    inside = out.split("#STEP-BEGIN", 1)[-1].split("#STEP-END", 1)[0]
    calls, ms = collections.Counter(), collections.Counter()
    for line in inside.splitlines():
        if not line.startswith("onednn_verbose") or ",exec," not in line:
            continue
        f = line.split(",")
        # onednn_verbose,<time>,primitive,exec,cpu,<kind>,<impl>,<prop>,...,<ms>
        try:
            i = f.index("exec")
            kind, impl = f[i + 2], f[i + 3]
            calls[f"{kind}: {impl}"] += 1
            ms[kind] += float(f[-1])
        except (ValueError, IndexError):
            continue
    return calls, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--precision", choices=("both", "float32", "bf16"), default="both",
                   help="which steps to profile (bf16 is emulated, and slow, on a CPU without bfloat16 instructions)")
    p.add_argument("--onednn-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.onednn_child:
        name, batch, dtype = args.onednn_child
        onednn_child(name, int(batch), dtype == "bf16")
        return
    from torch.profiler import profile

    lines = [f"# Where a training step goes: {args.model}, batch {args.batch}, 32x32, {args.threads} threads",
             f"({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, `python bench/profile_step.py "
             f"--model {args.model}`)", ""]
    gflop = step_gflop(args.model) * args.batch
    for bf16 in {"both": (False, True), "float32": (False,), "bf16": (True,)}[args.precision]:
        name = "bf16 autocast" if bf16 else "float32"
        step = make_step(args.model, args.batch, bf16)
        step()
        step()
        t = time.perf_counter()
        step()
        step()
        seconds = (time.perf_counter() - t) / 2
        ceiling = matmul_gflops(dtype=torch.bfloat16 if bf16 else torch.float32)
        with profile() as prof:
            step()
            step()
        by_group: collections.Counter = collections.Counter()
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                by_group[group_of(e.key)] += e.self_cpu_time_total
            elif e.key.startswith("## Call CompiledFxGraph"):  # densenet.models.fused's kernels
                by_group["fused elementwise kernels (compiled)"] += e.self_cpu_time_total
        total = sum(by_group.values())
        lines += [f"## {name}: {args.batch / seconds:.1f} images/s, {gflop / seconds:.0f} GFLOP/s "
                  f"({gflop / seconds / ceiling:.0%} of the {ceiling:.0f} GFLOP/s 2048^3 matrix product in this dtype)", "",
                  "| what | share of the step's operator time |", "|---|---|"]
        lines += [f"| {g} | {v / total:.1%} |" for g, v in by_group.most_common()]
        calls, ms = onednn_kernels(args.model, args.batch, bf16)
        lines += ["", "| oneDNN primitive: kernel (one step) | calls |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in calls.most_common(12)]
        lines += ["", "oneDNN time per primitive kind in that step: "
                  + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.most_common()) + f" (step {seconds * 1e3:.0f} ms)", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
