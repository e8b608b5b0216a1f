"""Synchronised batch normalisation that runs on any torch.distributed backend (gloo on CPUs too).

``torch.nn.SyncBatchNorm`` (torch 2.14) refuses CPU tensors. Here the batch statistics of every
process are combined exactly (per-process mean and biased variance, weighted by counts, so no
sum-of-squares cancellation), and in backward the two per-channel sums that the input gradient
needs (sum of dy and of dy * x_hat) are summed over processes. Parameter gradients stay local:
DistributedDataParallel averages them, which makes N processes x batch B/N compute the same
step as one process x batch B (up to floating-point summation order).

The dense blocks' shared-buffer path (``densenet.efficient``) calls :func:`sync_moments` and
:func:`sync_sum` itself when its layers hold :class:`SyncBatchNorm2d` modules.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ArgumentError

__all__ = ["SyncBatchNorm2d", "bn_backward", "bn_factor", "convert_sync_batchnorm", "sync_active", "sync_moments",
           "sync_sum", "update_running"]


def sync_active(group: Any = None) -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def sync_moments(mean: Tensor, var: Tensor, count: int, group: Any = None) -> tuple[Tensor, Tensor, int]:
    """Global per-channel mean and biased variance from every process's (mean, var) over ``count``
    values; returns (mean (C,), var (C,), total count)."""
    c = mean.numel()
    packed = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    g = torch.stack(gathered)
    counts = g[:, -1:]
    total = counts.sum()
    g_mean = (g[:, :c] * counts).sum(0) / total
    g_var = ((g[:, c : 2 * c] + (g[:, :c] - g_mean) ** 2) * counts).sum(0) / total
    return g_mean, g_var, int(round(float(total)))


def sync_sum(t: Tensor, group: Any = None) -> Tensor:
    """``t`` summed over all processes (a new tensor)."""
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def bn_backward(gy: Tensor, xhat: Tensor, invstd: Tensor, weight: Tensor | None, total: int,
                group: Any = None, sync: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN backward with statistics over all processes (``sync``; else this process's
    batch of ``total`` values per channel), on (M, C) row matrices (or any layout whose last
    dimension is the channel). Returns (grad of x, local grad of weight, local grad of bias)."""
    dims = tuple(range(gy.dim() - 1))
    acc = torch.promote_types(gy.dtype, torch.float32)  # the sums at least in float32 (summed in gy's dtype)
    sum_dy = gy.sum(dims).to(acc)
    sum_dy_xhat = (gy * xhat).sum(dims).to(acc)
    both = torch.cat([sum_dy, sum_dy_xhat])
    both = ((sync_sum(both, group) if sync else both) / total).to(gy.dtype)  # elementwise work in gy's dtype
    c = sum_dy.numel()
    scale = (invstd if weight is None else weight * invstd).to(gy.dtype)
    gx = (gy - both[:c] - xhat * both[c:]) * scale
    return gx, sum_dy_xhat, sum_dy


def bn_factor(bn: nn.BatchNorm2d) -> float:
    """Exponential-average factor of ``bn`` for this step, incrementing num_batches_tracked (as BatchNorm2d)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Running statistics of ``bn`` from one step's batch statistics over ``count`` values:
    running = (1 - f) * running + f * statistic, with the unbiased variance."""
    f = bn_factor(bn)
    with torch.no_grad():
        bn.running_mean.mul_(1 - f).add_(mean, alpha=f)
        bn.running_var.mul_(1 - f).add_(var, alpha=f * count / max(count - 1, 1))


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, bn: "SyncBatchNorm2d") -> Tensor:  # type: ignore[override]
        rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): channel last, whatever x's memory layout
        var, mean = torch.var_mean(rows, dim=(0, 1, 2), correction=0)
        mean, var, total = sync_moments(mean, var, rows.numel() // rows.shape[-1], bn.process_group)
        update_running(bn, mean, var, total)
        invstd = torch.rsqrt(var + bn.eps)
        xhat = (rows - mean) * invstd
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.total, ctx.group = total, bn.process_group
        return (xhat * weight + bias).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        gx, gw, gb = bn_backward(grad.permute(0, 2, 3, 1), xhat, invstd, weight, ctx.total, ctx.group)
        return gx.permute(0, 3, 1, 2), gw, gb, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics span all processes of ``process_group``
    (the default group when None). Outside distributed training it is exactly ``BatchNorm2d``."""

    process_group: Any = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.affine and self.track_running_stats and sync_active(self.process_group)):
            return super().forward(x)
        if x.dim() != 4:
            raise ArgumentError(f"SyncBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        return _SyncBNFunction.apply(x, self.weight, self.bias, self)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` in ``module`` into a :class:`SyncBatchNorm2d` in place (the same
    parameter and buffer objects, so optimizers, state dicts and checkpoints are unchanged)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            m.process_group = process_group
    return module
