"""3-D DenseNet-121 of this project against MONAI's, side by side in one run.

MONAI's ``DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)`` and this project's
``create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)`` (the same 11,244,674
parameters, the same weights loaded into both), batch 2 of 1-channel volumes, fp32:

- training seconds per step (a real SGD step: batch statistics, cross-entropy, backward, momentum
  update) of MONAI, this project's default (fast) mode and its memory-efficient mode, called in turn
  within every repeat, medians reported;
- inference seconds per batch (eval, no_grad), alternating the same way;
- peak memory of a training step above the process's RSS before the first step, each figure from a
  fresh process (as ``bench/bench_speed.py`` does for torchvision), the median of ``--memory-repeats``;
- ``--big 256``: peak RSS of a training step at 256^3 in a fresh process, memory-efficient mode and
  MONAI (a child that needs more than ``--memory-cap-gb`` of address space fails with "out of memory"
  instead of pushing the machine into swap or the OOM killer).

    python bench/bench_volumes.py                               # 96, 128, 160: the issue's table
    python bench/bench_volumes.py --sizes 32 48 --repeats 1     # a smoke run (a minute)
    python bench/bench_volumes.py --big 256                     # + the 256^3 memory check

Run it alone on the machine: timings of a shared machine are not comparable between runs (the ratios,
measured in the same run with the implementations alternating, hold better).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet import create_model  # noqa: E402
from densenet.models.weights import load_state_dict, to_monai_state_dict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import peak_rss_bytes, rss_bytes, train_step_fn  # noqa: E402  (the same step and RSS readings)

IMPLS = ("monai", "ours", "ours_me")
BATCH, CLASSES = 2, 2


def build(impl: str) -> torch.nn.Module:
    if impl == "monai":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=CLASSES)
    return create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=CLASSES,
                        memory_efficient=impl == "ours_me")


def same_weights(models: dict[str, torch.nn.Module]) -> None:
    """Every model gets the weights of the first of ours (MONAI's under MONAI's names)."""
    ours = next(m for k, m in models.items() if k != "monai")
    for k, m in models.items():
        if k == "monai":
            m.load_state_dict(to_monai_state_dict(ours))
        elif m is not ours:
            load_state_dict(m, ours.state_dict())


def data(size: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, size, size, size, generator=g), torch.randint(0, CLASSES, (batch,), generator=g)


def timed_alternating(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of each fn, calling them in turn within every repeat (after ``warmup``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def memory_child(impl: str, size: int, steps: int, threads: int, cap: float) -> None:
    """In a fresh process: one JSON line, peak RSS above the RSS before the first step, and the peak."""
    if cap > 0:  # address space, not RSS: a failed allocation instead of the OOM killer
        limit = int(cap * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(threads)
    model = build(impl)
    x, y = data(size)
    step = train_step_fn(model, x, y)
    base = rss_bytes()
    t = time.perf_counter()
    try:
        for _ in range(steps):
            step()
    except (RuntimeError, MemoryError) as e:  # an allocation refused under the cap
        print(json.dumps({"error": f"out of memory under a {cap:g} GB address-space cap ({str(e).splitlines()[0][:120]})",
                          "peak": peak_rss_bytes()}))
        return
    print(json.dumps({"above_baseline": peak_rss_bytes() - base, "peak": peak_rss_bytes(), "baseline": base,
                      "seconds_per_step": (time.perf_counter() - t) / steps}))


def measure_memory(impl: str, size: int, steps: int, threads: int, cap: float) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", impl, str(size), str(steps), str(threads), str(cap)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def median_memory(impl: str, size: int, repeats: int, steps: int, threads: int, cap: float) -> dict:
    runs = [measure_memory(impl, size, steps, threads, cap) for _ in range(repeats)]
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["above_baseline"])
    if not ok:
        return runs[0]
    r = ok[len(ok) // 2]
    return {**r, "all_above_baseline": [x["above_baseline"] for x in ok]} if len(ok) > 1 else r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160], help="volume sides (default 96 128 160)")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps per implementation and size")
    p.add_argument("--inference-repeats", type=int, default=3)
    p.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per memory figure (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--big", type=int, nargs="*", default=[], help="sides for the peak-RSS check (e.g. 256)")
    p.add_argument("--memory-cap-gb", type=float, default=20.0,
                   help="address-space cap of each memory child (default 20; 0: none)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        impl, size, steps, threads, cap = args.memory_child
        memory_child(impl, int(size), int(steps), int(threads), float(cap))
        return
    torch.set_num_threads(args.threads)
    import monai

    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
                   f"torch {torch.__version__}, monai {monai.__version__}",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    print(f"# {results['date']}  {results['machine']}\n# {results['command']}\n")
    params = {k: sum(q.numel() for q in build(k).parameters()) for k in ("monai", "ours")}
    print(f"parameters: MONAI {params['monai']:,}, ours {params['ours']:,}\n")
    results["parameters"] = params

    for size in args.sizes:
        x, y = data(size)
        if not args.no_train:
            models = {k: build(k) for k in IMPLS}
            same_weights(models)
            times = timed_alternating({k: train_step_fn(m, x, y) for k, m in models.items()}, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[f"train {size}"] = {"median_s": med, "all_s": times}
            print(f"## training step, batch {BATCH} at {size}^3 (median of {args.repeats})")
            for k, s in med.items():
                print(f"  {k:8s} {s:7.2f} s/step  speed {med['monai'] / s:5.2f}x MONAI   "
                      f"(steps: {', '.join(f'{t:.2f}' for t in times[k])})")
            del models
        if not args.no_inference:
            models = {k: build(k).eval() for k in ("monai", "ours")}
            same_weights(models)
            with torch.no_grad():
                expected = models["monai"](x)
                diff = ((models["ours"](x) - expected).abs().max() / expected.abs().max()).item()
                times = timed_alternating({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, args.inference_repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[f"inference {size}"] = {"median_s": med, "all_s": times, "max_rel_diff": diff}
            print(f"## inference, batch {BATCH} at {size}^3 (median of {args.inference_repeats}; "
                  f"max |ours - MONAI| / max |MONAI| {diff:.1e})")
            for k, s in med.items():
                print(f"  {k:8s} {s:7.2f} s/batch  speed {med['monai'] / s:5.2f}x MONAI")
            del models
        if not args.no_memory:
            print(f"## peak memory of a training step above baseline, batch {BATCH} at {size}^3 (fresh process each)")
            mem = {k: median_memory(k, size, args.memory_repeats, 2, args.threads, args.memory_cap_gb) for k in IMPLS}
            results[f"memory {size}"] = mem
            for k, r in mem.items():
                if "error" in r:
                    print(f"  {k:8s} {r['error']}")
                    continue
                spread = (f" (median of {', '.join(f'{b / 2**20:.0f}' for b in r['all_above_baseline'])})"
                          if "all_above_baseline" in r else "")
                ratio = (f"  {r['above_baseline'] / mem['monai']['above_baseline']:.2f}x MONAI"
                         if "above_baseline" in mem["monai"] else "")
                print(f"  {k:8s} {r['above_baseline'] / 2**20:7.0f} MB above baseline{ratio}, peak RSS "
                      f"{r['peak'] / 2**30:5.2f} GiB{spread}")
        print()
    for size in args.big:
        print(f"## peak RSS of a training step, batch {BATCH} at {size}^3 (fresh process each, one step)")
        for k in ("ours_me", "monai"):
            r = measure_memory(k, size, 1, args.threads, args.memory_cap_gb)
            results[f"big {size} {k}"] = r
            if "error" in r:
                print(f"  {k:8s} {r['error']}")
            else:
                print(f"  {k:8s} peak RSS {r['peak'] / 2**30:5.2f} GiB ({r['peak'] / 1e9:.2f} GB), "
                      f"{r['above_baseline'] / 2**30:5.2f} GiB above baseline, {r['seconds_per_step']:.0f} s for the step")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
