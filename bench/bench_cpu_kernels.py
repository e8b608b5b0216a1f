"""The hand-written AVX-512 kernels (densenet/models/cpu_kernels.py) against TorchInductor's fused
kernels and the eager chain, on the shapes a DenseNet-BC-100 step gives them (batch 64, 32x32): one
kernel at a time, alternating, medians; with the largest difference from the eager result.

    python bench/bench_cpu_kernels.py
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from densenet.models import cpu_kernels, fused

# (rows, channels, buffer width): the block buffers of BC-100 k=12 at batch 64 (32x32, 16x16, 8x8)
SHAPES = [(65536, 12, 216), (65536, 120, 216), (16384, 12, 342), (16384, 250, 342), (4096, 12, 342), (4096, 330, 342)]


def _median_us(fns: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t) / inner * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def _with(hand: bool, f: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        cpu_kernels.set_enabled(hand)
        try:
            return f()
        finally:
            cpu_kernels.set_enabled(None)
    return run


def _cases(m: int, c: int, width: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(eager, fast) calls of each kernel on matrices of this shape, slices of one wider buffer."""
    buf = torch.randn(m, 3 * width).bfloat16()
    x, xh, d = buf[:, :c], buf[:, width:width + c], buf[:, 2 * width:2 * width + c]
    scale, shift = torch.randn(c).bfloat16(), torch.randn(c).bfloat16()
    invstd = torch.rand(c) + 0.5
    out = torch.empty(m, c, dtype=torch.bfloat16)
    g_t, t_out = torch.randn(m, c).bfloat16(), torch.randn(m, c).bfloat16()
    offset, weight = torch.randn(c) * 0.1, torch.rand(c) + 0.5

    def relu_backward(backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        gw = d.clone()  # the accumulated gradient is updated in place: a fresh copy per call
        return torch.cat([gw.flatten().float(), *backward(g_t.clone(), t_out.clone(), None, x, offset, invstd, gw,
                                                          weight, torch.float32)])

    def train_backward_args() -> tuple[torch.Tensor, ...]:  # (N, C, H, W) channels_last, as BN2 gets them
        side = int((m // 64) ** 0.5)
        z4 = g_t.view(64, side, side, c).permute(0, 3, 1, 2)
        return z4, t_out.view(64, side, side, c).permute(0, 3, 1, 2), z4, offset, invstd, weight

    cases = {
        "bn_relu": (lambda: fused._bn_relu_eager(x, scale, shift, out.clone()),
                    lambda: fused.bn_relu(x, scale, shift, out)),
        "normalise": (lambda: fused._normalise_eager(x, offset, invstd, out.clone()),
                      lambda: fused.normalise(x, offset, invstd, out)),
        "bn_relu_backward": (lambda: relu_backward(fused._bn_relu_backward_eager),
                             lambda: relu_backward(fused.bn_relu_backward)),
        "bn_relu_train_backward": (lambda: fused._bn_relu_train_backward_eager(*train_backward_args(), 1e-5),
                                   lambda: fused.bn_relu_train_backward(*train_backward_args(), 1e-5)),
        "bn_input_backward": (lambda: fused._bn_input_backward_eager(x, xh, invstd, d, m),
                              lambda: fused.bn_input_backward(x, xh, invstd, d, m)),
    }
    return cases


def _flat(out: object) -> torch.Tensor:
    """A kernel's output, or its outputs one after the other, as one float32 vector."""
    outs = out if isinstance(out, tuple) else (out,)
    return torch.cat([t.float().flatten() for t in outs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {time.strftime('%Y-%m-%dT%H:%M')}, torch {torch.__version__}, {args.threads} threads, "
          f"AVX512_BF16: {torch.cpu._is_avx512_bf16_supported()}; microseconds per call, medians of {args.repeats}")
    print("| kernel | rows x channels (buffer width) | eager | Inductor | hand | Inductor / hand | max diff hand-eager |")
    print("|---|---|---|---|---|---|---|")
    for m, c, width in SHAPES:
        cases = _cases(m, c, width)
        for name, (eager, fast) in cases.items():
            t = _median_us({"eager": eager, "inductor": _with(False, fast), "hand": _with(True, fast)},
                           args.repeats, args.inner)
            ref = _flat(eager())
            diff = (_flat(_with(True, fast)()) - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
            print(f"| {name} | {m} x {c} ({width}) | {t['eager']:.0f} | {t['inductor']:.0f} | {t['hand']:.0f} | "
                  f"**{t['inductor'] / t['hand']:.2f}x** | {diff:.1e} |")


if __name__ == "__main__":
    main()
