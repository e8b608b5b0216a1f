"""The 3-D stem convolution's weight gradient (7x7x7, stride 2, one input channel: a CT or MR volume):
oneDNN's direct backward against the space-to-depth form the fast path uses (a 4x4x4 convolution
over 8 phase channels, ``densenet.models.efficient._conv0_grads``), alternating, medians; and the
largest relative difference of the two gradients.

    python bench/bench_stem3d_grad.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from densenet.models.efficient import _conv0_grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 64, 7, 2, 3, bias=False)
    w = conv.weight.detach().contiguous(memory_format=torch.channels_last_3d)
    for shape in [(2, 1, 64, 64, 64), (4, 1, 96, 96, 96)]:
        x = torch.randn(*shape)
        g = torch.randn(shape[0], 64, *(s // 2 for s in shape[2:])).contiguous(memory_format=torch.channels_last_3d)
        runs = {
            "direct": lambda g=g, x=x: torch.ops.aten.convolution_backward(g, x, w, None, [2] * 3, [3] * 3, [1] * 3,
                                                                         False, [0] * 3, 1, [False, True, False])[1],
            "space_to_depth": lambda g=g, x=x: _conv0_grads(g, x, w, conv, False, True)[1],
        }
        a, b = runs["direct"](), runs["space_to_depth"]()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        direct, s2d = (statistics.median(times[k]) for k in runs)
        print(f"{shape}: direct {direct * 1e3:.0f} ms, space-to-depth {s2d * 1e3:.0f} ms ({direct / s2d:.2f}x), "
              f"relative difference {((a - b).abs().max() / a.abs().max()).item():.1e}")


if __name__ == "__main__":
    main()
