"""This project's DenseNet against torchvision's, side by side in one run.

Training images/s (a real SGD step: batch statistics, cross-entropy, backward, momentum update),
inference images/s (eval, no_grad) and peak memory above the process's RSS before the first step
(each memory figure from a fresh subprocess), with ratios; plus achieved GFLOP/s against a
2048^3 fp32 matrix product measured in the same run. Implementations alternate within every
repeat and medians are reported, so ratios hold even when the machine is shared.

    python bench/bench_speed.py                 # a few minutes: BC-100 train + inference, memory
    python bench/bench_speed.py --full          # + BC-250 k=24 and DenseNet-121 training and memory
    python bench/bench_speed.py --compile       # + torch.compile of the fast model (~5 min to compile)
    python bench/bench_speed.py --levers        # + the layer-by-layer form, NCHW and channels_last
    python bench/bench_speed.py --no-train      # inference and memory only
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet import create_model  # noqa: E402
from densenet.models import cpu_kernels, fused  # noqa: E402
from densenet.serving.inference import prepare_for_inference  # noqa: E402
from densenet.training import allocator  # noqa: E402

CASES = {  # name: (model, image side, batch)
    "bc40": ("densenet_bc40_k12", 32, 64),
    "bc100": ("densenet_bc100_k12", 32, 64),
    "bc250": ("densenet_bc250_k24", 32, 64),
    "d121": ("densenet121", 224, 16),
}


def torchvision_model(name: str, memory_efficient: bool = False) -> torch.nn.Module:
    """torchvision's DenseNet classes; CIFAR models as the paper's DenseNet-BC (3x3 stem with 2k maps, 3 blocks)."""
    if name == "densenet121":
        return torchvision.models.densenet121(weights=None, memory_efficient=memory_efficient)
    k = 24 if name == "densenet_bc250_k24" else 12
    n = {"densenet_bc40_k12": 6, "densenet_bc100_k12": 16, "densenet_bc250_k24": 41}[name]
    m = torchvision.models.DenseNet(k, (n, n, n), 2 * k, num_classes=10, memory_efficient=memory_efficient)
    m.features.conv0 = torch.nn.Conv2d(3, 2 * k, 3, padding=1, bias=False)
    del m.features.norm0, m.features.relu0, m.features.pool0
    return m


#: implementations trained under torch.autocast("cpu", torch.bfloat16) with channels_last input: the
#: ``_bf`` suffix (what `densenet train` does by default on a CPU with bfloat16 instructions)
BF16_SUFFIX = "_bf"
#: ``+keep`` suffix, with ``--processes`` only: the process keeps freed memory (what `densenet train` does on the CPU)
KEEP_SUFFIX = "+keep"


def build(impl: str, name: str) -> torch.nn.Module:
    if impl.endswith(BF16_SUFFIX):
        return build(impl[: -len(BF16_SUFFIX)], name).to(memory_format=torch.channels_last)
    if impl in ("ours_unfused", "ours_onestage", "ours_inductor"):  # the fast path without the fused kernels,
        return build("ours", name)  # with their column sums in one stage (one_stage), or without the hand kernels
    if impl == "tv":
        return torchvision_model(name)
    if impl == "tv_me":
        return torchvision_model(name, memory_efficient=True)
    if impl == "ours":
        return create_model(name, num_classes=10 if "bc" in name else 1000)
    if impl == "ours_me":
        return create_model(name, num_classes=10 if "bc" in name else 1000, memory_efficient=True)
    if impl == "ours_ref":  # the paper's layer-by-layer form (concatenation per layer), NCHW
        return create_model(name, num_classes=10 if "bc" in name else 1000, fast=False)
    if impl == "ours_ref_cl":  # the same in channels_last: the layout lever alone
        return create_model(name, num_classes=10 if "bc" in name else 1000, fast=False).to(memory_format=torch.channels_last)
    raise ValueError(impl)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    model.train()
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _switched_off(set_enabled: Callable[[bool | None], None], step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with a kernel family switched off while it runs, back to its default after."""
    def run() -> None:
        set_enabled(False)
        try:
            step()
        finally:
            set_enabled(None)
    return run


def unfused(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the fused CPU kernels turned off while it runs (the lever alone)."""
    return _switched_off(fused.set_enabled, step)


def inductor_only(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the hand-written AVX-512 kernels off: every fused pass through Inductor's code
    (the lever of densenet/models/cpu_kernels.py alone)."""
    return _switched_off(cpu_kernels.set_enabled, step)


def one_stage(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the fused kernels' column sums in one stage over all rows, as before 2026-12-06
    (the kernels recompile once for it: Dynamo guards on ``fused.ROW_BLOCK``)."""
    def run() -> None:
        block, fused.ROW_BLOCK = fused.ROW_BLOCK, 1 << 62
        try:
            step()
        finally:
            fused.ROW_BLOCK = block
    return run


def train_steps(impls: list[str], name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One training step per configuration, every model starting from the first one's weights."""
    models = {impl: build(impl, name) for impl in impls}
    state = models[impls[0]].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    fns = {impl: train_step_fn(m, x, y, impl.endswith(BF16_SUFFIX)) for impl, m in models.items()}
    wrap = {"ours_unfused": unfused, "ours_onestage": one_stage, "ours_inductor": inductor_only}
    return {impl: wrap.get(impl.removesuffix(BF16_SUFFIX), lambda f: f)(fn) for impl, fn in fns.items()}


def data(name: str, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    classes = 10 if "bc" in name else 1000
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def forward_gflop(name: str, size: int) -> float:
    """GFLOP of one image's forward pass (torch.utils.flop_counter on the layer-by-layer form)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build("ours_ref", name).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def matmul_gflops(repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def timed_alternating(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn within every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_worker(conn, impl: str, name: str, size: int, batch: int, threads: int) -> None:
    """One configuration's training step in its own process, run each time the parent asks. A name
    ending in ``+keep`` (``ours+keep``, ``tv+keep``) keeps freed memory for reuse in that process first,
    as ``densenet train`` does on the CPU (densenet.training.allocator)."""
    torch.set_num_threads(threads)
    if impl.endswith(KEEP_SUFFIX):
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    x, y = data(name, size, batch)
    base = impl.removesuffix(KEEP_SUFFIX)
    fn = train_steps([base], name, x, y)[base]
    conn.send("ready")
    while conn.recv() == "step":
        t = time.perf_counter()
        fn()
        conn.send(time.perf_counter() - t)


def timed_in_processes(impls: list[str], name: str, size: int, batch: int, repeats: int, warmup: int = 1,
                       threads: int = 2) -> dict[str, float]:
    """:func:`timed_alternating` of training steps with each configuration in its own process (its own
    heap, allocator state and compiled kernels, as in a real training run), the processes taking
    turns: one step at a time, the others waiting. In one process the configurations' memory
    interferes: with six of them the fused kernels' gain vanished (docs/speed.md)."""
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for impl in impls:  # one at a time: building and warming up use the whole CPU
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_step_worker, args=(child, impl, name, size, batch, threads), daemon=True)
            proc.start()
            workers[impl] = (proc, parent)
            if parent.recv() != "ready":
                raise RuntimeError(f"{impl}: the worker did not start")
            for _ in range(warmup):
                parent.send("step")
                parent.recv()
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(repeats):
            for impl, (_, conn) in workers.items():
                conn.send("step")
                times[impl].append(conn.recv())
    finally:
        for proc, conn in workers.values():
            conn.send("stop")
            proc.join(timeout=30)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM. (ru_maxrss would do in a process started from a small
    parent, but on Linux it carries the parent's peak across fork + exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(impl: str, case: str, batch: int, steps: int) -> None:
    """Run in a fresh process: print peak RSS above the RSS before the first training step (bytes)."""
    torch.set_num_threads(2)
    name, size, _ = CASES[case]
    model = build(impl, name)
    x, y = data(name, size, batch)
    step = train_step_fn(model, x, y, impl.endswith(BF16_SUFFIX))
    base = rss_bytes()
    for _ in range(steps):
        step()
    peak = peak_rss_bytes()
    print(json.dumps({"above_baseline": peak - base, "peak": peak}))


def measure_memory(impl: str, case: str, batch: int, steps: int = 2) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", impl, case, str(batch), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--processes", action="store_true",
                   help="train each configuration in its own process, the processes taking turns (see timed_in_processes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", action="store_true", help="also BC-250 k=24 and DenseNet-121 training (slow: tens of minutes)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--no-train", action="store_true", help="skip the training throughput section")
    p.add_argument("--memory-repeats", type=int, default=1,
                   help="fresh processes per memory figure; the median is reported (default 1)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--compile", action="store_true", help="also torch.compile the fast model for training (~300 s compile)")
    p.add_argument("--levers", action="store_true",
                   help="also train the layer-by-layer form of this project (NCHW and channels_last), to separate the levers")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.processes and args.compile:
        p.error("--compile runs in one process: leave out --processes")
    if args.memory_child:
        impl, case, batch, steps = args.memory_child
        memory_child(impl, case, int(batch), int(steps))
        return
    torch.set_num_threads(args.threads)
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
                   f"torchvision {torchvision.__version__}",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    ceiling = matmul_gflops()
    results["matmul_gflops"] = ceiling
    results["matmul_gflops_bf16"] = ceiling_bf16 = matmul_gflops(dtype=torch.bfloat16)
    print(f"# {results['date']}  {results['machine']}\n# 2048^3 matrix product: fp32 {ceiling:.1f} GFLOP/s, "
          f"bf16 {ceiling_bf16:.1f} GFLOP/s\n# ours: {fused.status()}\n")

    def report(title: str, per_s: dict[str, float], gflop_per_image: float, base: str) -> None:
        print(f"## {title}")
        for k, v in per_s.items():
            gf = v * gflop_per_image
            top = ceiling_bf16 if k.endswith(BF16_SUFFIX) else ceiling
            print(f"  {k:12s} {v:8.2f} img/s  {v / per_s[base]:5.2f}x {base}  {gf:6.1f} GFLOP/s ({gf / top:4.0%} of its matmul)")
        results[title] = per_s

    # ---------------------------------------------------------------- training throughput
    bc100 = ["tv", "tv_bf", "ours", "ours_bf", "ours_unfused_bf", "ours_inductor_bf", "ours_me_bf"]
    if args.levers:
        bc100 += ["tv_me", "ours_me", "ours_ref", "ours_ref_cl", "ours_ref_bf"]
    train_cases = [("bc100", 64, bc100, args.repeats)] if not (args.memory_only or args.no_train) else []
    if args.full:
        train_cases += [("bc40", 64, ["tv", "tv_bf", "ours", "ours_bf", "ours_inductor_bf"], args.repeats),
                        ("d121", 16, ["tv", "tv_bf", "ours", "ours_bf", "ours_me_bf"], 3)]
    for case, batch, impls, repeats in train_cases:
        name, size, _ = CASES[case]
        if args.processes:
            sec = timed_in_processes(impls, name, size, batch, repeats, warmup=2, threads=args.threads)
        else:
            x, y = data(name, size, batch)
            fns = train_steps(impls, name, x, y)
            if args.compile and case == "bc100":
                compiled = torch.compile(build("ours", name))
                t = time.perf_counter()
                fns["ours_compiled"] = train_step_fn(compiled, x, y)
                fns["ours_compiled"]()
                print(f"  torch.compile + first step: {time.perf_counter() - t:.0f} s")
            sec = timed_alternating(fns, repeats, warmup=2)  # the second step too: compiled kernels settle in
            del fns
        report(f"train {name} {size}x{size} batch {batch}", {k: batch / s for k, s in sec.items()},
               3 * forward_gflop(name, size), "tv" if "tv" in impls else impls[0])

    # ---------------------------------------------------------------- inference throughput
    for case in ("bc100", "bc250", "d121") if not args.memory_only else ():
        name, size, batch = CASES[case]
        x, _ = data(name, size, batch)
        tv, ours = build("tv", name).eval(), build("ours", name).eval()
        ours.load_state_dict(tv.state_dict())
        with torch.no_grad():
            tv.features.norm5.running_var.uniform_(0.5, 2)  # non-trivial statistics
        ours.load_state_dict(tv.state_dict())
        fast = prepare_for_inference(ours)
        fns: dict[str, Callable] = {"tv": tv, "ours_eval": ours, "ours_fast": fast}
        if not args.no_onnx:
            fns["ours_onnx"] = prepare_for_inference(ours, "onnx", example=x[:1], threads=args.threads)
        with torch.no_grad():
            ref = tv(x)
            for k, fn in fns.items():
                err = (fn(x) - ref).abs().max().item() / ref.abs().max().item()
                results[f"max rel diff {k} {name}"] = err
            sec = timed_alternating({k: (lambda fn=fn, x=x: fn(x)) for k, fn in fns.items()}, args.repeats)
        report(f"inference {name} {size}x{size} batch {batch}", {k: batch / s for k, s in sec.items()},
               forward_gflop(name, size), "tv")
        print("  max |diff| / max |logit| against torchvision:",
              ", ".join(f"{k} {results[f'max rel diff {k} {name}']:.1e}" for k in fns))

    # ---------------------------------------------------------------- memory, fresh process each
    if not args.no_memory:
        mem_cases = [("bc100", 64, ["tv", "tv_bf", "ours", "ours_bf", "ours_me_bf"]), ("bc250", 64, ["ours_me"])]
        if args.full:
            mem_cases += [("bc250", 16, ["tv", "tv_me", "ours", "ours_me"]), ("bc250", 64, ["tv_me", "ours"]),
                          ("d121", 16, ["tv", "tv_me", "ours", "ours_me"])]
        print("## peak memory of a training step (fresh process each)")
        for case, batch, impls in mem_cases:
            for impl in impls:
                runs = [measure_memory(impl, case, batch) for _ in range(args.memory_repeats)]
                ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["above_baseline"])
                r = ok[len(ok) // 2] if ok else runs[0]
                if len(ok) > 1:
                    r = {**r, "all_above_baseline": [x["above_baseline"] for x in ok]}
                results[f"memory {case} batch {batch} {impl}"] = r
                if "error" in r:
                    print(f"  {case} batch {batch} {impl:8s} {r['error']}")
                else:
                    spread = ""
                    if "all_above_baseline" in r:
                        spread = f" (median of {', '.join(f'{b / 2**30:.2f}' for b in r['all_above_baseline'])})"
                    print(f"  {case} batch {batch} {impl:8s} above baseline {r['above_baseline'] / 2**30:6.2f} GiB{spread}, "
                          f"peak RSS {r['peak'] / 2**30:6.2f} GiB")
    after = matmul_gflops()
    results["matmul_gflops_after"] = after
    print(f"# fp32 2048^3 matrix product again at the end: {after:.1f} GFLOP/s (the shares above use the first)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
