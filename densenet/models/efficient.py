"""Fast and memory-efficient dense blocks: one shared buffer per block, BN statistics computed once.

A dense block's output is the concatenation of its input and every layer's k new maps. Here it is
one pre-allocated (N, H, W, C_out) buffer (channels_last; (N, L, C_out) for 1-D signals and
(N, D, H, W, C_out) for 3-D volumes: everything below holds for any number of spatial dimensions,
with M = N x the number of positions); layer l reads the channel prefix
``buf[..., :C_l]`` and writes its k maps into ``buf[..., C_l:C_l + k]``, so nothing is ever
concatenated. In training, the batch statistics of a map are the same numbers for every later
layer's first BN (only the affine weight differs per layer), so they are computed once, when the
map is written; each layer's BN1 is then one affine map over the prefix, and in backward the BN1
gradients of all readers of a map are summed first and pushed through the BN normalisation once.

The 1x1 convolution of a bottleneck layer is one matrix product over the N*H*W rows of the
(strided) prefix. Backward is written by hand (``_DenseBlockFunction``):

- standard mode saves, per layer, the bottleneck output before BN2 (4k maps) and after ReLU
  (4k maps); BN1-ReLU of the prefix is recomputed (one cheap elementwise pass);
- memory-efficient mode saves only the block buffer and per-channel statistics, and recomputes
  BN1-ReLU, the 1x1 convolution and BN2-ReLU in backward: activation memory is linear in depth.
  Its backward holds the buffer, its gradient and the accumulated BN1 gradients (three (M, C)
  matrices), runs BN1-ReLU and the 1x1 convolution over chunks of rows, and keeps each layer's
  bottleneck maps in two (M, 4k) workspaces that every layer reuses.

Every pass reuses workspaces instead of allocating a fresh full-size tensor per layer: on a VM a
fresh large tensor costs page faults that take longer than the arithmetic on it.

Running statistics are updated exactly once per forward, with ``nn.BatchNorm2d``'s semantics
(momentum or cumulative average, unbiased running variance, ``num_batches_tracked`` + 1).
In eval mode without gradients, BN2 is folded into the 1x1 convolution (inference path).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import (
    ROW_BLOCK,
    add_per_channel,
    bn_input_backward,
    bn_relu,
    bn_relu_backward,
    bn_relu_pool_train,
    bn_relu_pool_train_backward,
    bn_relu_recompute,
    bn_relu_train,
    bn_relu_train_backward,
    compiled_for,
    store_maps,
)
from .fused import as_nchw as _nchw
from .fused import as_rows as _rows
from .fused import colsum as _colsum
from .fused import normalise as _normalise
from .fused import vec as _vec
from .sync_bn import SyncBatchNorm2d, bn_backward, bn_factor, sync_active, sync_moments, update_running

__all__ = ["autocast_on", "bn_relu_pool", "bn_relu_pool_eval", "can_fuse_bn_relu_pool", "can_fuse_stem",
           "can_use_fast_block", "fast_block_forward", "fused_stem", "hooks_inside"]

_aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float64)
_HALF = (torch.bfloat16, torch.float16)
_BN = nn.modules.batchnorm._BatchNorm
_NORM_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_AVG_POOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _norm_dims(norm: nn.Module) -> int | None:
    """The spatial dimensions of a BatchNorm1d/2d/3d (or a subclass), None for anything else."""
    return next((d for cls, d in _NORM_DIMS.items() if isinstance(norm, cls)), None)


def _positions(x: Tensor) -> int:
    """Values per channel of a (N, C, *spatial) batch: N times the number of positions."""
    return x.shape[0] * math.prod(x.shape[2:])


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def hooks_inside(module: nn.Module) -> bool:
    """Whether any hook (forward, forward-pre, backward, backward-pre) is registered on a submodule
    of ``module`` (the module itself excluded) or globally: a fused computation would not call it
    with what the layer-by-layer form gives it."""
    if _global_hooks():
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for name, m in module.named_modules() if name)


def autocast_on(x: Tensor) -> bool:
    """Whether autocast (mixed precision) is active for ``x``'s device."""
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _supported_input(x: Tensor, params: nn.Module) -> bool:
    """float32/64 input and parameters, or under autocast (bfloat16 / float16) float32 parameters
    with float32 input or input in autocast's dtype."""
    weights = next(params.parameters(), None)
    if weights is None or weights.dtype not in _FLOATS:
        return False
    if not autocast_on(x):
        return x.dtype in _FLOATS
    low = torch.get_autocast_dtype(x.device.type)
    return low in _HALF and weights.dtype == torch.float32 and x.dtype in (torch.float32, low)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What the kernels compute in: autocast's dtype under autocast, else the input's."""
    return torch.get_autocast_dtype(x.device.type) if autocast_on(x) else x.dtype


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Batch statistics, reductions and BN gradients: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x: Tensor) -> Any:
    """A context that turns autocast off on ``x``'s device (the kernels cast explicitly)."""
    return torch.autocast(x.device.type, enabled=False) if autocast_on(x) else nullcontext()


def can_use_fast_block(block: nn.ModuleDict, x: Tensor) -> bool:
    """Whether the dense block ``block`` can run the shared-buffer implementation on ``x``.

    Falls back (False) for: dropout in training, hooks on any module inside the block (they would
    not see the fused computation), eval mode with gradients, non-standard BN settings, a
    training batch with one value per channel (BN raises there), or input and parameters that are
    neither float32/64 nor float32 under bfloat16/float16 autocast.
    """
    if not len(block) or x.dim() != next(iter(block.values())).conv1.weight.dim() or x.dim() < 3:
        return False
    if not _supported_input(x, block) or hooks_inside(block):
        return False
    training = block.training
    if training and _positions(x) <= 1:
        return False
    if not training and torch.is_grad_enabled():
        return False
    layers = list(block.values())
    eps = layers[0].norm1.eps
    for layer in layers:
        if layer.training != training or (training and layer.drop_rate > 0) or layer.norm1.eps != eps:
            return False
        for m in layer.modules():
            if m.training != training:
                return False
            if isinstance(m, _BN) and not (m.affine and m.track_running_stats and m.running_mean is not None):
                return False
    return True


def _conv_backward(spec: "_Block", g_o: Tensor, inp: Tensor, weight: Tensor, mask: list[bool]) -> tuple[Any, ...]:
    """Gradients of a stride-1, padding-1 (3x3, 3, 3x3x3) convolution without bias."""
    ones, zeros = [1] * spec.d, [0] * spec.d
    return _aten.convolution_backward(g_o, inp, weight, None, ones, ones, ones, False, zeros, 1, mask)


class _Block:
    """Python-side description of a dense block for the autograd function."""

    def __init__(self, block: nn.ModuleDict, x: Tensor, memory_efficient: bool) -> None:
        self.layers: list[nn.Module] = list(block.values())
        self.n, self.c0 = x.shape[:2]
        self.spatial = tuple(x.shape[2:])  # (H, W); (L,) for signals, (D, H, W) for volumes
        self.d = len(self.spatial)
        self.conv = _CONV_FN[self.d]
        self.m = _positions(x)
        self.dtype = x.dtype  # the buffer's and the convolutions'
        self.stat_dtype = _stat_dtype(x.dtype)  # statistics, reductions, BN1 gradients
        # a bfloat16/float16 buffer stores each map less its batch mean rounded to the buffer's dtype
        # (its "centre"), so that BN1's shift stays small and rounds harmlessly (see _bn1_affine)
        self.centred = self.dtype != self.stat_dtype
        self.k = self.layers[0].growth_rate
        self.c = self.c0 + len(self.layers) * self.k
        self.bottleneck = self.layers[0].bottleneck
        self.eps = self.layers[0].norm1.eps
        self.memory_efficient = memory_efficient
        # synchronised BN (densenet.sync_bn): statistics and BN backward sums span all processes
        norm1 = self.layers[0].norm1
        self.sync = isinstance(norm1, SyncBatchNorm2d) and block.training and sync_active(norm1.process_group)
        self.group = norm1.process_group if self.sync else None
        self.total = self.m  # values per channel in the (global) batch; set by the first statistics

    def params(self) -> list[Tensor]:
        out: list[Tensor] = []
        for layer in self.layers:
            out += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
            if self.bottleneck:
                out += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
        return out

    def compute_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        """``params`` with the convolution weights in the compute dtype (BN's stay as they are)."""
        per = 6 if self.bottleneck else 3
        return [p.to(self.dtype) if i % per in (2, 5) else p for i, p in enumerate(params)]


def _bn1_affine(invstd: Tensor, offset: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """BN1 of one layer as ``stored * scale + shift`` (per channel, in the buffer's ``dtype``), where
    ``offset`` is the batch mean of the stored values (the maps' mean less the block's centre)."""
    scale = weight * invstd
    return scale.to(dtype), (bias - offset * scale).to(dtype)


def _bn1_relu(rows: Tensor, bn1: tuple[Tensor, Tensor], out: Tensor | None = None) -> Tensor:
    """relu(rows * scale + shift) of an (M, C) matrix (a strided channel prefix of the buffer), into ``out``."""
    return bn_relu(rows, *bn1, out=out)


def _offset(mean: Tensor, centre: Tensor | None, lo: int = 0, hi: int | None = None) -> Tensor:
    """Batch mean of the stored values of channels [lo, hi): the maps' mean, less the centre."""
    return mean[lo:hi] if centre is None else mean[lo:hi] - centre[lo:hi].to(mean.dtype)


def _affine_centred(x: Tensor, mean: Tensor, scale: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """``(x - mean) * scale + bias`` per channel (last dimension) in x's dtype, precise in bfloat16
    too: there ``x * scale + (bias - mean * scale)`` would round ``mean * scale`` to 8 bits, an error
    the same for every value of a channel (a bias of a few percent of its spread when |mean| >> std).
    Centred on the mean rounded to x's dtype, what is rounded is zero on average."""
    if x.dtype == mean.dtype:
        return torch.addcmul(bias - mean * scale, x, scale, out=out)
    centre = mean.to(x.dtype)
    t = torch.sub(x, centre, out=out)
    return torch.addcmul(_vec(bias - (mean - centre.to(mean.dtype)) * scale, x), t, _vec(scale, x), out=t)


def _centred_moments(z: Tensor, work: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance (``dtype`` vectors) of an (M, C) matrix, using ``work`` (M, C):
    differences from a first estimate of the mean, so that a bfloat16 matrix's statistics are as
    precise as its values (its sums are rounded to 8 bits)."""
    m = z.shape[0]
    first = (_colsum(z, dtype) / m).to(z.dtype)
    d = torch.sub(z, first, out=work)
    rest = _colsum(d, dtype) / m
    var = _colsum(d * d, dtype) / m - rest * rest
    return first.to(dtype) + rest, var.clamp_min_(0)


def _moments(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over the rows of an (M, C) matrix, two passes (``torch.var_mean``
    runs 2-4x slower on these column reductions on CPU; the two-pass variance is as exact)."""
    mean = rows.mean(0)
    d = rows - mean
    return d.mul_(d).mean(0), mean


def _chunk_stats(spec: "_Block", rows: Tensor, lo: int, hi: int, mean: Tensor, var: Tensor, invstd: Tensor) -> None:
    """Batch mean, biased variance and 1/sqrt(var + eps) of ``rows`` (M, hi - lo), the maps of buffer
    channels [lo, hi), into slices (over all processes' batches with synchronised BN). ``rows`` is
    the contiguous matrix the maps came from (not the strided buffer slice), so that a bfloat16
    buffer's maps convert to float32 in one cheap pass."""
    v, mu = _moments(rows.to(spec.stat_dtype))
    if spec.sync:
        mu, v, spec.total = sync_moments(mu, v, spec.m, spec.group)
    mean[lo:hi] = mu
    var[lo:hi] = v
    invstd[lo:hi] = torch.rsqrt(v + spec.eps)


def _workspace(like: Tensor, spec: "_Block") -> Tensor:
    """Flat scratch memory for one (M, C_l) matrix of the widest layer, reused by every layer: a
    fresh tensor per layer would cost its page faults each time (tens of ms per layer on a VM)."""
    return like.new_empty(spec.m * spec.layers[-1].in_channels)


def _block_forward(
    spec: _Block, x: Tensor, params: Sequence[Tensor], save: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Any]]:
    """Training-mode forward (batch statistics). Returns the (M, C) buffer, the per-channel batch
    mean and inverse std, the per-channel biased variance, if ``save`` per-layer saved tensors, and
    the centre (None in float32/64): the buffer holds the maps less the centre (see _Block)."""
    n, sp, m, k, c0 = spec.n, spec.spatial, spec.m, spec.k, spec.c0
    buf = x.new_empty(n, *sp, spec.c)
    b2 = buf.view(m, spec.c)
    mean = x.new_empty(spec.c, dtype=spec.stat_dtype)
    var = x.new_empty(spec.c, dtype=spec.stat_dtype)
    invstd = x.new_empty(spec.c, dtype=spec.stat_dtype)
    centre = x.new_empty(spec.c) if spec.centred else None

    def store(rows: Tensor, lo: int, hi: int) -> None:
        """Maps of channels [lo, hi), an (M, hi - lo) matrix, into the buffer, with their statistics."""
        stats = None if spec.sync else store_maps(rows, b2[:, lo:hi], spec.centred, spec.stat_dtype)
        if stats is not None:  # one fused pass: statistics, and the maps stored less their centre
            mean[lo:hi], var[lo:hi] = stats
            invstd[lo:hi] = torch.rsqrt(stats[1] + spec.eps)
            if centre is not None:
                centre[lo:hi] = stats[0]
        elif centre is None:
            b2[:, lo:hi].copy_(rows)
            _chunk_stats(spec, b2[:, lo:hi], lo, hi, mean, var, invstd)
        else:  # statistics first, from the contiguous maps; then stored less their centre
            _chunk_stats(spec, rows, lo, hi, mean, var, invstd)
            centre[lo:hi] = mean[lo:hi]
            torch.sub(rows, centre[lo:hi], out=b2[:, lo:hi])

    store(_rows(x), 0, c0)
    per = 6 if spec.bottleneck else 3
    saved: list[Any] = []
    lean = spec.memory_efficient and spec.bottleneck
    ws = None if lean else _workspace(x, spec)
    ws_z, ws_r = _bottleneck_workspaces(x, spec)
    for i, layer in enumerate(spec.layers):
        c = layer.in_channels
        p = params[per * i : per * (i + 1)]
        update_running(layer.norm1, mean[:c], var[:c], spec.total)
        bn1 = _bn1_affine(invstd[:c], _offset(mean, centre, 0, c), p[0], p[1], b2.dtype)
        if not lean:
            t = _bn1_relu(b2[:, :c], bn1, out=ws[: m * c].view(m, c))
        if spec.bottleneck:
            norm2 = layer.norm2
            w1 = p[2].view(-1, c)
            if lean:  # BN1-ReLU and the 1x1 convolution a chunk of rows at a time, into a workspace
                z = _bn_relu_matmul_rows(b2[:, :c], bn1, w1, ws_z)
            elif spec.sync:
                z = t @ w1.t()
            if lean and not spec.sync and compiled_for(z):  # one fused pass; backward recomputes it alike
                r, m2, s2 = bn_relu_train(_nchw(z, n, sp), p[3], p[4], norm2)
                z4 = _nchw(z, n, sp)
            elif spec.memory_efficient or spec.sync:  # BN2 by hand: into workspaces, or over all processes
                r_rows = ws_r if spec.memory_efficient else torch.empty_like(z)
                m2, v2 = _centred_moments(z, r_rows, spec.stat_dtype)
                total = m
                if spec.sync:
                    m2, v2, total = sync_moments(m2, v2, m, spec.group)
                update_running(norm2, m2, v2, total)
                s2 = torch.rsqrt(v2 + norm2.eps)
                r = _nchw(_affine_centred(z, m2, p[3] * s2, p[4], out=r_rows).relu_(), n, sp)
                z4 = _nchw(z, n, sp)
            else:
                z4 = _nchw(t @ w1.t(), n, sp)
                r, m2, s2 = bn_relu_train(z4, p[3], p[4], norm2)
            o = spec.conv(r, p[5], padding=1)
            if save:
                saved.append((m2, s2) if spec.memory_efficient else (m2, s2, z4, r))
        else:
            o = spec.conv(_nchw(t, n, sp), p[2], padding=1)
        store(_rows(o), c, c + k)
    return b2, mean, invstd, var, saved, centre


def _bottleneck_workspaces(like: Tensor, spec: _Block) -> tuple[Tensor | None, Tensor | None]:
    """Two (M, 4k) matrices for the memory-efficient mode's bottleneck output before and after BN2-ReLU
    (reused by every layer); None otherwise (standard mode keeps each layer's own for backward)."""
    if not (spec.memory_efficient and spec.bottleneck):
        return None, None
    width = spec.layers[0].conv1.out_channels
    return like.new_empty(spec.m, width), like.new_empty(spec.m, width)


ROW_CHUNK_BYTES = 1 << 24  # size of each row chunk's temporaries in the memory-efficient mode (16 MB: 4 MB took 1.2x longer)


def _rows_per_chunk(t: Tensor, row_numel: int) -> int:
    """How many rows of ``row_numel`` elements of ``t``'s dtype make one chunk of ROW_CHUNK_BYTES: a
    multiple of the fused kernels' row block where there are that many (their sums are fastest so)."""
    rows = max(1, ROW_CHUNK_BYTES // (t.element_size() * row_numel))
    return rows - rows % ROW_BLOCK if rows > ROW_BLOCK else rows


def _bn_relu_matmul_rows(prefix: Tensor, bn1: tuple[Tensor, Tensor], w1: Tensor, out: Tensor) -> Tensor:
    """relu(BN1(prefix)) @ w1.T into ``out`` (M, 4k), a chunk of rows of the (M, C_l) prefix at a
    time, so that no (M, C_l) temporary exists."""
    rows = _rows_per_chunk(prefix, prefix.shape[1])
    for a in range(0, prefix.shape[0], rows):
        torch.mm(_bn1_relu(prefix[a : a + rows], bn1), w1.t(), out=out[a : a + rows])
    return out


def _lean_bottleneck_backward(
    spec: _Block, b2: Tensor, offset: Tensor, invstd: Tensor, p: Sequence[Tensor], m2: Tensor, s2: Tensor,
    c: int, g_o: Tensor, gw: Tensor, ws_z: Tensor, ws_r: Tensor, eps2: float,
) -> list[Tensor]:
    """Backward of one bottleneck layer in the memory-efficient mode, recomputing its forward.

    BN1-ReLU and the 1x1 convolution run over chunks of rows of the (M, C_l) prefix, so no (M, C_l)
    temporary exists; the bottleneck output (M, 4k) before and after BN2-ReLU lives in ``ws_z`` and
    ``ws_r``. Adds BN1 weight * (grad of the normalised prefix) to ``gw``; returns the layer's six
    parameter gradients in :meth:`_Block.params` order. ``offset``: the batch mean of the stored values."""
    n, sp, m = spec.n, spec.spatial, spec.m
    bn1 = _bn1_affine(invstd[:c], offset[:c], p[0], p[1], b2.dtype)
    w1, prefix = p[2].view(-1, c), b2[:, :c]
    rows = _rows_per_chunk(b2, c)
    z = _bn_relu_matmul_rows(prefix, bn1, w1, ws_z)
    sc2 = p[3] * s2
    fused_r = None if spec.sync else bn_relu_recompute(z, m2, s2, p[3], p[4], ws_r)
    r = _affine_centred(z, m2, sc2, p[4], out=ws_r).relu_() if fused_r is None else fused_r
    g_r, g_w2, _ = _conv_backward(spec, g_o, _nchw(r, n, sp), p[5], [True, True, False])
    sdt = spec.stat_dtype
    if fused_r is not None:  # BN2-ReLU backward in one fused pass
        g_z4, g_n2w, g_n2b = bn_relu_train_backward(g_r, _nchw(r, n, sp), _nchw(z, n, sp), m2, s2, p[3], eps2)
        g_z = _rows(g_z4)
    elif spec.sync:
        g_u = _aten.threshold_backward(g_r, _nchw(r, n, sp), 0)
        g_z, g_n2w, g_n2b = bn_backward(_rows(g_u), _affine_centred(z, m2, s2, torch.zeros_like(s2)), s2, p[3], spec.total,
                                        spec.group)
    else:  # BN2-ReLU backward in place; temporaries in the workspaces
        g_z = _rows(g_r)
        _aten.threshold_backward.grad_input(g_z, r, 0, grad_input=g_z)
        zhat = _affine_centred(z, m2, s2, torch.zeros_like(s2), out=r)  # r's memory
        g_n2b = _colsum(g_z, sdt)
        g_n2w = _colsum(torch.mul(g_z, zhat, out=z), sdt)  # z's memory (zhat holds what is needed of z)
        g_z.sub_(_vec(g_n2b / m, z)).sub_(zhat.mul_(_vec(g_n2w / m, z))).mul_(_vec(sc2, z))
    g_w1 = torch.zeros(w1.shape, dtype=sdt, device=w1.device)  # summed over row chunks: at least float32
    g_b1, g_w1n = torch.zeros_like(offset[:c]), torch.zeros_like(offset[:c])
    for a in range(0, m, rows):
        t = _bn1_relu(prefix[a : a + rows], bn1)  # in the buffer's dtype
        if g_w1.dtype == t.dtype:
            g_w1.addmm_(g_z[a : a + rows].t(), t)
        else:
            g_w1 += g_z[a : a + rows].t() @ t
        g = g_z[a : a + rows] @ w1
        g_b, g_wn = bn_relu_backward(g, t, None, prefix[a : a + rows], offset[:c], invstd[:c], gw[a : a + rows, :c], p[0], sdt)
        g_b1 += g_b
        g_w1n += g_wn
    return [g_w1n, g_b1, g_w1.as_strided(p[2].shape, p[2].stride()), g_n2w, g_n2b, g_w2]


def _block_backward(
    spec: _Block, b2: Tensor, mean: Tensor, invstd: Tensor, params: Sequence[Tensor], saved: list[Any], grad: Tensor,
    centre: Tensor | None,
) -> tuple[Tensor, list[Tensor]]:
    """Gradients of the block input and of every parameter, walking the layers in reverse."""
    n, sp, k, c0 = spec.n, spec.spatial, spec.k, spec.c0
    gd = _rows(grad)  # direct gradient of the buffer (a view when grad is channels_last; never written)
    sdt = spec.stat_dtype
    gw = b2.new_zeros(b2.shape)  # sum over readers of BN1 weight * grad of the normalised map (buffer's dtype)
    # x_hat (the normalised buffer) enters BN1's weight gradient (sum(g * x) - mean * sum(g) instead
    # would lose precision when |mean| >> std). Standard mode computes it once per block; the
    # memory-efficient mode recomputes each layer's prefix of it, a chunk of rows at a time.
    offset = _offset(mean, centre)
    xhat = None if spec.memory_efficient else _normalise(b2, offset, invstd)
    lean = spec.memory_efficient and spec.bottleneck
    ws_z, ws_r = _bottleneck_workspaces(b2, spec)
    ws_t = None if lean else _workspace(b2, spec)
    ws_g = _workspace(b2, spec) if spec.bottleneck and not lean else None
    m = spec.m
    per = 6 if spec.bottleneck else 3
    grads: list[Tensor] = [torch.empty(0)] * len(params)

    def normalised(lo: int, hi: int) -> Tensor:
        if xhat is not None:
            return xhat[:, lo:hi]
        return _normalise(b2[:, lo:hi], offset[lo:hi], invstd[lo:hi])

    def finish(lo: int, hi: int) -> Tensor:
        """Final gradient of buffer channels [lo, hi): direct + BN normalisation backward of gw."""
        if spec.sync:
            g_bn = bn_backward(gw[:, lo:hi], normalised(lo, hi), invstd[lo:hi], None, spec.total, spec.group)[0]
            return g_bn.add_(gd[:, lo:hi])  # in the buffer's dtype
        return bn_input_backward(gw[:, lo:hi], normalised(lo, hi), invstd[lo:hi], gd[:, lo:hi], spec.total)

    for i in reversed(range(len(spec.layers))):
        layer = spec.layers[i]
        c = layer.in_channels
        p = params[per * i : per * (i + 1)]
        g_o = gd[:, c : c + k] if i == len(spec.layers) - 1 else finish(c, c + k)
        g_o = _nchw(g_o.to(spec.dtype).contiguous(), n, sp)
        if lean:
            grads[per * i : per * (i + 1)] = _lean_bottleneck_backward(
                spec, b2, offset, invstd, p, *saved[i], c, g_o, gw, ws_z, ws_r, layer.norm2.eps)
            continue
        t = _bn1_relu(b2[:, :c], _bn1_affine(invstd[:c], offset[:c], p[0], p[1], b2.dtype), out=ws_t[: m * c].view(m, c))
        if spec.bottleneck:
            norm2 = layer.norm2
            m2, s2, z4, r4 = saved[i]
            g_r, g_w2, _ = _conv_backward(spec, g_o, r4, p[5], [True, True, False])
            if spec.sync:
                g_u = _aten.threshold_backward(g_r, r4, 0)
                zhat = _affine_centred(_rows(z4), m2, s2, torch.zeros_like(s2))
                g_z, g_n2w, g_n2b = bn_backward(_rows(g_u), zhat, s2, p[3], spec.total, spec.group)
            else:
                g_z, g_n2w, g_n2b = bn_relu_train_backward(g_r, r4, z4, m2, s2, p[3], norm2.eps)
                g_z = _rows(g_z)
            g_w1 = (g_z.t() @ t).as_strided(p[2].shape, p[2].stride())  # the weight's own strides (DDP buckets)
            grads[per * i + 3], grads[per * i + 4], grads[per * i + 5] = g_n2w, g_n2b, g_w2
            g_t = torch.mm(g_z, p[2].view(-1, c), out=ws_g[: m * c].view(m, c))
        else:
            g_t4, g_w1, _ = _conv_backward(spec, g_o, _nchw(t, n, sp), p[2], [True, True, False])
            g_t = _rows(g_t4)
            if not g_t.is_contiguous():
                g_t = g_t.contiguous()
        g_b1, g_w1n = bn_relu_backward(g_t, t, None if xhat is None else xhat[:, :c], b2[:, :c], offset[:c], invstd[:c],
                                       gw[:, :c], p[0], sdt)
        grads[per * i], grads[per * i + 1], grads[per * i + 2] = g_w1n, g_b1, g_w1
    g_x = finish(0, c0)
    return _nchw(g_x.to(spec.dtype).contiguous(), n, sp), grads


def _block_output(spec: _Block, b2: Tensor, centre: Tensor | None) -> Tensor:
    """The block's output (N, C, *spatial) from its (M, C) buffer: the buffer itself, or in a centred
    buffer a new tensor with the centres added back (one pass; the buffer is kept for backward)."""
    return _nchw(b2 if centre is None else add_per_channel(b2, centre), spec.n, spec.spatial)


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: _Block, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        b2, mean, invstd, _, saved, centre = _block_forward(spec, x, spec.compute_params(params), save=True)
        ctx.spec = spec
        ctx.per_layer = len(saved[0]) if saved else 0
        # everything goes through save_for_backward (visible to saved_tensors_hooks, checked for in-place changes)
        ctx.save_for_backward(b2, mean, invstd, centre, *params, *[t for layer in saved for t in layer])
        return _block_output(spec, b2, centre)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        b2, mean, invstd, centre, *rest = ctx.saved_tensors
        spec: _Block = ctx.spec
        n_params = len(rest) - ctx.per_layer * (len(spec.layers) if ctx.per_layer else 0)
        params, flat = rest[:n_params], rest[n_params:]
        per = ctx.per_layer
        saved = [tuple(flat[per * i : per * (i + 1)]) for i in range(len(spec.layers))] if per else []
        with _no_autocast(grad):
            g_x, grads = _block_backward(spec, b2, mean, invstd, spec.compute_params(params), saved, grad, centre)
        # gradients in their parameters' dtype and memory layout
        return (None, g_x, *[g.to(p.dtype, memory_format=torch.preserve_format) for g, p in zip(grads, params)])


def _inference_forward(spec: _Block, x: Tensor) -> Tensor:
    """Eval-mode forward without autograd: running statistics, BN2 folded into the 1x1 convolution."""
    n, sp, m, k, c0 = spec.n, spec.spatial, spec.m, spec.k, spec.c0
    buf = x.new_empty(n, *sp, spec.c)
    buf[..., :c0].copy_(x.movedim(1, -1))
    b2 = buf.view(m, spec.c)
    ws = _workspace(x, spec)
    ws_r = x.new_empty(m, spec.layers[0].conv1.out_channels) if spec.bottleneck else None
    for layer in spec.layers:
        c = layer.in_channels
        n1 = layer.norm1
        bn1 = _bn1_affine(torch.rsqrt(n1.running_var + n1.eps), n1.running_mean, n1.weight, n1.bias, b2.dtype)
        t = _bn1_relu(b2[:, :c], bn1, out=ws[: m * c].view(m, c))
        if spec.bottleneck:
            n2 = layer.norm2
            s2 = n2.weight * torch.rsqrt(n2.running_var + n2.eps)
            w1 = (layer.conv1.weight.view(-1, c) * s2[:, None]).to(spec.dtype)
            r = torch.addmm((n2.bias - n2.running_mean * s2).to(spec.dtype), t, w1.t(), out=ws_r).relu_()
            o = spec.conv(_nchw(r, n, sp), layer.conv2.weight.to(spec.dtype), padding=1)
        else:
            o = spec.conv(_nchw(t, n, sp), layer.conv1.weight.to(spec.dtype), padding=1)
        b2[:, c : c + k].copy_(_rows(o))
    return _nchw(b2, n, sp)


def fast_block_forward(block: nn.ModuleDict, x: Tensor, memory_efficient: bool = False) -> Tensor:
    """Run ``block`` on x (N, C_in, H, W) with the shared buffer; returns (N, C_out, H, W), channels_last
    (any number of spatial sides: (N, C, L) signals, (N, C, D, H, W) volumes).

    Call only when ``can_use_fast_block(block, x)``. Under autocast the buffer and the convolutions
    are in autocast's dtype (the output too, as the layer-by-layer form gives it); batch statistics,
    reductions and BN gradients stay in float32.
    """
    with _no_autocast(x):
        x = x.to(_compute_dtype(x))
        spec = _Block(block, x, memory_efficient)
        if not block.training:
            with torch.no_grad():
                return _inference_forward(spec, x)
        params = spec.params()
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _DenseBlockFunction.apply(spec, x, *params)
        with torch.no_grad():
            b2, *_, centre = _block_forward(spec, x, spec.compute_params(params), save=False)
        return _block_output(spec, b2, centre)


# ---------------------------------------------------------------------------- transitions
def can_fuse_bn_relu_pool(norm: nn.Module, x: Tensor) -> bool:
    """Whether a transition's BN-ReLU-2x2 average pool can run as :func:`bn_relu_pool`: training
    with gradients, a plain ``nn.BatchNorm1d/2d/3d`` (not synchronised) of x's dimensions, float input,
    more than one value per channel (BN raises on one). The transition checks for hooks."""
    return (
        type(norm) in _NORM_DIMS and x.dim() == 2 + _NORM_DIMS[type(norm)] and norm.training
        and torch.is_grad_enabled() and _supported_input(x, norm) and norm.affine and norm.track_running_stats
        and _positions(x) > 1
    )


def _avg_pool_backward(grad: Tensor, y: Tensor) -> Tensor:
    """Gradient of ``y`` through a 2-wide (2x2, 2x2x2) average pool with stride 2."""
    d = y.dim() - 2
    if d == 3 and grad.dtype in (torch.float32, torch.float64):
        return _aten.avg_pool3d_backward(grad, y, [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, None)
    if d == 3:  # PyTorch has no bfloat16/float16 kernel for this one: each output's gradient / 8 to its 2x2x2 inputs
        g = F.interpolate(grad, scale_factor=2, mode="nearest").mul_(0.125)  # exact: a power of two
        pad = [0, 0] * 3
        for i, (n_in, n_out) in enumerate(zip(y.shape[2:], g.shape[2:])):
            pad[2 * (2 - i) + 1] = n_in - n_out  # an odd size's last slice feeds no output: zero gradient
        return F.pad(g, pad) if any(pad) else g
    if d == 2:
        return _aten.avg_pool2d_backward(grad, y, [2, 2], [2, 2], [0, 0], False, True, None)
    # 1-D: the 2-D kernel on (N, C, L, 1), as avg_pool1d itself computes
    return _aten.avg_pool2d_backward(grad.unsqueeze(-1), y.unsqueeze(-1), [2, 1], [2, 1], [0, 0], False, True,
                                     None).squeeze(-1)


class _BNReLUPool(torch.autograd.Function):
    """avg_pool2d(relu(batch_norm(x)), 2) saving only x and the batch statistics; BN-ReLU is
    recomputed in backward, so no full-resolution activation is kept between the passes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, norm: nn.BatchNorm2d) -> Tensor:  # type: ignore[override]
        fused_out = bn_relu_pool_train(x, weight, bias, norm)  # one compiled kernel where it runs
        if fused_out is not None:
            out, mean, invstd = fused_out
        else:
            f = bn_factor(norm)  # BN in x's dtype (statistics in float32), as the layer-by-layer form under autocast
            y, mean, invstd = _aten.native_batch_norm(x, weight, bias, norm.running_mean, norm.running_var, True, f,
                                                      norm.eps)
            out = _AVG_POOL_FN[x.dim() - 2](y.relu_(), 2)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.fused = fused_out is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # two full-resolution temporaries (g, y), the rest in place: each fresh full-size tensor costs
        # its page faults, which on a VM take longer than the arithmetic
        x, weight, bias, mean, invstd = ctx.saved_tensors
        fused_grads = bn_relu_pool_train_backward(grad, x, weight, bias, mean, invstd) if ctx.fused else None
        if fused_grads is not None:
            return (*fused_grads, None)
        grad = grad.to(x.dtype)  # everything in x's dtype (bfloat16 under autocast), sums at least float32
        sdt = _stat_dtype(x.dtype)
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        scale = _vec(weight * invstd, x).view(per_channel)
        mu, inv = _vec(mean, x).view(per_channel), _vec(invstd, x).view(per_channel)
        y = torch.addcmul(_vec(bias - mean * weight * invstd, x).view(per_channel), x, scale).relu_()
        g = _avg_pool_backward(grad, y)
        if not g.is_contiguous(memory_format=_layout_of(y)):
            g = g.contiguous(memory_format=_layout_of(y))
        g = _aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
        dims = (0, *range(2, x.dim()))
        xhat = torch.sub(x, mu, out=y).mul_(inv)  # y's memory
        gb = g.sum(dims).to(sdt)
        gw = torch.mul(g, xhat, out=xhat).sum(dims).to(sdt)
        count = g.numel() // g.shape[1]
        # x_hat again: its first copy became g * x_hat (recomputing is cheaper than a third temporary)
        xhat = torch.sub(x, mu, out=y).mul_(inv)
        gx = g.sub_(_vec(gb / count, x).view(per_channel)).sub_(xhat.mul_(_vec(gw / count, x).view(per_channel))).mul_(scale)
        return gx, gw, gb, None


def _layout_of(x: Tensor) -> torch.memory_format:
    """x's memory format: channels_last (or its 3-D form) when x has it, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def bn_relu_pool(norm: nn.Module, x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H // 2, W // 2): training-mode BN (running statistics updated once),
    ReLU and 2x2 average pooling (every side halved for 1-D and 3-D input); call only when
    :func:`can_fuse_bn_relu_pool`."""
    return _BNReLUPool.apply(x, norm.weight, norm.bias, norm)


def bn_relu_pool_eval(norm: nn.Module, x: Tensor) -> Tensor | None:
    """Eval-mode BN (running statistics), ReLU and 2x2 average pool without autograd, (N, C, H, W) ->
    (N, C, H // 2, W // 2) (1-D and 3-D alike), a few images at a time so that no full-size
    temporary is allocated. Returns None when it does not apply (training, gradients, no running
    statistics, autocast). The transition checks for hooks."""
    d = _norm_dims(norm)
    if (
        d is None or norm.training or torch.is_grad_enabled() or x.dim() != 2 + d
        or not _supported_input(x, norm) or not norm.affine or norm.running_mean is None
    ):
        return None
    n, c = x.shape[:2]
    per_channel = (1, -1) + (1,) * d
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = (norm.bias - norm.running_mean * scale).view(per_channel)
    scale = scale.view(per_channel)
    out = torch.empty(n, c, *(s // 2 for s in x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
    per = _rows_per_chunk(x, c * math.prod(x.shape[2:]))
    for a in range(0, n, per):
        out[a : a + per] = _AVG_POOL_FN[d](torch.addcmul(shift, x[a : a + per], scale).relu_(), 2)
    return out


# ---------------------------------------------------------------------------- the ImageNet stem
#: size of each chunk of images that the fused stem's BN-ReLU-max pool works on at a time
STEM_CHUNK_BYTES = 1 << 25


def _conv_positions(conv: nn.Module, x: Tensor) -> int:
    """Values per channel of ``conv(x)``."""
    sides = [(s + 2 * p - dl * (k - 1) - 1) // st + 1
             for s, k, st, p, dl in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
    return x.shape[0] * math.prod(sides)


def can_fuse_stem(norm: nn.Module, relu: nn.Module, pool: nn.Module, x: Tensor, conv: nn.Module | None = None) -> bool:
    """Whether the stem's BN-ReLU-3x3/2 max pool can run fused on ``x`` (or, with ``conv``, on
    ``conv(x)``: :func:`fused_stem`): training with gradients, a plain
    ``nn.BatchNorm1d/2d/3d`` of x's dimensions, float32/64 input without autocast, more than one value
    per channel, and no hook on the three modules (nor a global one)."""
    d = _NORM_DIMS.get(type(norm))
    positions = _positions(x) if conv is None else _conv_positions(conv, x)
    ok = (
        d is not None and x.dim() == 2 + d and type(relu) is nn.ReLU and not relu.inplace
        and isinstance(pool, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and norm.training and torch.is_grad_enabled()
        and x.dtype in _FLOATS and not autocast_on(x) and norm.weight is not None and norm.weight.dtype == x.dtype
        and norm.affine and norm.track_running_stats and positions > 1 and not _global_hooks()
        and (conv is None or conv.weight.dtype == x.dtype)
    )
    if not ok:
        return False
    k, s, p = (pool.kernel_size, pool.stride, pool.padding)
    if (k, s, p, pool.dilation, pool.ceil_mode) not in ((3, 2, 1, 1, False), ((3,) * d, (2,) * d, (1,) * d, (1,) * d, False)):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in (norm, relu, pool))


def _max_pool(y: Tensor) -> tuple[Tensor, Tensor]:
    """3x3/2 (3, 3x3x3) max pool with padding 1, and its indices; 1-D as the 2-D kernel on (N, C, 1, L)."""
    d = y.dim() - 2
    if d == 3:
        return _aten.max_pool3d_with_indices(y, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False)
    if d == 2:
        return _aten.max_pool2d_with_indices(y, [3, 3], [2, 2], [1, 1], [1, 1], False)
    out, idx = _aten.max_pool2d_with_indices(y.unsqueeze(2), [1, 3], [1, 2], [0, 1], [1, 1], False)
    return out.squeeze(2), idx.squeeze(2)


def _max_pool_backward(grad: Tensor, y: Tensor, idx: Tensor, out: Tensor) -> Tensor:
    """The gradient of ``y`` through :func:`_max_pool`, written into ``out`` (shaped as y)."""
    d = y.dim() - 2
    if d == 3:
        return _aten.max_pool3d_with_indices_backward.grad_input(grad, y, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False,
                                                                 idx, grad_input=out)
    if d == 2:
        return _aten.max_pool2d_with_indices_backward.grad_input(grad, y, [3, 3], [2, 2], [1, 1], [1, 1], False, idx,
                                                                 grad_input=out)
    out.copy_(_aten.max_pool2d_with_indices_backward(grad.unsqueeze(2), y.unsqueeze(2), [1, 3], [1, 2], [0, 1], [1, 1],
                                                     False, idx.unsqueeze(2)).squeeze(2))
    return out


def _image_chunks(x: Tensor) -> range:
    """Start of each chunk of images of ``x`` with about STEM_CHUNK_BYTES of values (one image at least)."""
    per = max(1, STEM_CHUNK_BYTES // max(1, x.element_size() * x[0].numel()))
    return range(0, x.shape[0], per)


def _stem_stats(norm: nn.Module, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch mean and 1/std of ``x`` (running statistics updated once), and BN's per-channel scale and shift."""
    var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), correction=0)
    update_running(norm, mean, var, _positions(x))
    invstd = torch.rsqrt(var + norm.eps)
    return mean, invstd, *_stem_affine(x, weight, bias, mean, invstd)


def _stem_affine(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    return (weight * invstd).view(per_channel), (bias - mean * weight * invstd).view(per_channel)


def _stem_forward(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """max_pool(relu(x * scale + shift)), a chunk of images at a time (no full-size temporary)."""
    chunks = _image_chunks(x)
    out = None
    for a in chunks:
        part = _max_pool(torch.addcmul(shift, x[a : a + chunks.step], scale).relu_())[0]
        if out is None:
            out = part if len(chunks) == 1 else part.new_empty((x.shape[0], *part.shape[1:]))
        if len(chunks) > 1:
            out[a : a + chunks.step] = part
    return out


def _stem_backward(x: Tensor, grad: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, BN weight and BN bias through BN-ReLU-max pool; the ReLU output and the pool's
    indices are recomputed a chunk of images at a time. Holds x's gradient and one chunk's temporaries."""
    scale, shift = _stem_affine(x, weight, bias, mean, invstd)
    per_channel = scale.shape
    dims = (0, *range(2, x.dim()))
    m, i = mean.view(per_channel), invstd.view(per_channel)
    chunks = _image_chunks(x)
    gx = torch.empty_like(x)
    gb = torch.zeros_like(mean)
    gw = torch.zeros_like(mean)
    for a in chunks:  # first pass: the gradient of BN's output (into gx), and its two sums
        b = a + chunks.step
        y = torch.addcmul(shift, x[a:b], scale).relu_()
        g = _max_pool_backward(grad[a:b], y, _max_pool(y)[1], gx[a:b])
        _aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
        gb += g.sum(dims)
        gw += torch.mul(g, torch.sub(x[a:b], m, out=y).mul_(i), out=y).sum(dims)  # g * x_hat, in y's memory
    count = _positions(x)
    for a in chunks:  # second pass: BN's input gradient, x_hat recomputed
        b = a + chunks.step
        xhat = torch.sub(x[a:b], m).mul_(i)
        gx[a:b].sub_((gb / count).view(per_channel)).sub_(xhat.mul_((gw / count).view(per_channel))).mul_(scale)
    return gx, gw, gb


def _space_to_depth(x: Tensor) -> Tensor:
    """(N, C, *sides) padded by 3 (and 1 more at the end of odd sides) -> (N, C * 2^d, *halves): each
    2x2x2 block of positions becomes 8 channels. A 7x7x7 stride-2 convolution of x with padding 3 is a
    4x4x4 stride-1 convolution of this, which oneDNN differentiates several times faster when x has
    one channel (a CT or MR volume)."""
    d = x.dim() - 2
    pads: list[int] = []
    for side in reversed(x.shape[2:]):
        pads += [3, 3 + side % 2]
    xp = F.pad(x, pads)
    n, c, *sides = xp.shape
    split = [n, c] + [v for s in sides for v in (s // 2, 2)]
    order = [0, 1] + [3 + 2 * k for k in range(d)] + [2 + 2 * k for k in range(d)]
    out = xp.reshape(split).permute(order).reshape(n, c * 2**d, *(s // 2 for s in sides))
    return out.contiguous(memory_format=torch.channels_last_3d) if d == 3 else out


def _depth_to_weight(g: Tensor, out_channels: int, in_channels: int, d: int) -> Tensor:
    """The 4x4x4 kernel gradient over the 8 phase channels -> the 7x7x7 kernel's (inverse of the
    rearrangement in :func:`_space_to_depth`; the eighth tap of each axis, which is padding, dropped)."""
    g = g.reshape([out_channels, in_channels] + [2] * d + [4] * d)
    order = [0, 1] + [v for k in range(d) for v in (2 + d + k, 2 + k)]
    g = g.permute(order).reshape([out_channels, in_channels] + [8] * d)
    return g[(slice(None), slice(None)) + (slice(0, 7),) * d]


def _conv0_grads(g: Tensor, x: Tensor, conv_w: Tensor, conv: nn.Module, need_x: bool, need_w: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the stem convolution's input and weight from that of its output ``g``."""
    d = x.dim() - 2
    ones, zeros = [1] * d, [0] * d
    g_x = g_w = None
    if need_x:
        g_x = _aten.convolution_backward(g, x, conv_w, None, list(conv.stride), list(conv.padding), list(conv.dilation),
                                         False, zeros, conv.groups, [True, False, False])[0]
    if need_w:
        if (d == 3 and tuple(conv.kernel_size) == (7,) * 3 and tuple(conv.stride) == (2,) * 3
                and tuple(conv.padding) == (3,) * 3 and tuple(conv.dilation) == (1,) * 3 and conv.groups == 1):
            xs = _space_to_depth(x)
            ws = torch.empty((conv_w.shape[0], xs.shape[1], 4, 4, 4), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last_3d)
            gs = _aten.convolution_backward(g, xs, ws, None, ones, zeros, ones, False, zeros, 1, [False, True, False])[1]
            g_w = _depth_to_weight(gs, conv_w.shape[0], conv_w.shape[1], d).contiguous(
                memory_format=torch.channels_last_3d if conv_w.is_contiguous(memory_format=torch.channels_last_3d)
                else torch.contiguous_format)
        else:
            g_w = _aten.convolution_backward(g, x, conv_w, None, list(conv.stride), list(conv.padding),
                                             list(conv.dilation), False, zeros, conv.groups, [False, True, False])[1]
    return g_x, g_w


class _Stem(torch.autograd.Function):
    """The whole ImageNet stem in training, conv-BN-ReLU-max pool. Neither the BN-ReLU output nor
    the pool's indices are kept: backward recomputes both, a chunk of images at a time.

    ``keep`` (the fast mode) keeps the convolution's output: one full-resolution tensor where the
    layer-by-layer form keeps two and the indices. Without it (the memory-efficient mode) only the
    stem's input is kept, and backward never holds a full-resolution tensor: a first pass computes
    the convolution of a chunk again, the gradient of BN's output and its two per-channel sums; a
    second pass computes them again with the sums known, and the convolution's gradients of the
    chunk (two more stem convolutions per step than the fast mode)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, conv_w: Tensor, weight: Tensor, bias: Tensor, conv: nn.Module,  # type: ignore[override]
                norm: nn.Module, keep: bool) -> Tensor:
        c = conv._conv_forward(x, conv_w, None)
        mean, invstd, scale, shift = _stem_stats(norm, c, weight, bias)
        out = _stem_forward(c, scale, shift)
        ctx.save_for_backward(x, conv_w, weight, bias, mean, invstd, *([c] if keep else []))
        ctx.conv, ctx.per_image = conv, c[0].numel() * c.element_size()
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, conv_w, weight, bias, mean, invstd, *kept = ctx.saved_tensors
        conv = ctx.conv
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if kept:
            gc, gw, gb = _stem_backward(kept[0], grad, weight, bias, mean, invstd)
            del kept
            g_x, g_cw = _conv0_grads(gc, x, conv_w, conv, need_x, need_w)
            return g_x, g_cw, gw, gb, None, None, None
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        dims = (0, *range(2, x.dim()))
        scale, shift = _stem_affine(grad, weight, bias, mean, invstd)
        m, i = mean.view(per_channel), invstd.view(per_channel)
        step = max(1, STEM_CHUNK_BYTES // max(1, ctx.per_image))

        def output_grad(a: int) -> tuple[Tensor, Tensor]:
            """(the chunk's convolution output, the gradient of BN's output there)."""
            with torch.no_grad():
                c = conv._conv_forward(x[a : a + step], conv_w, None)
            y = torch.addcmul(shift, c, scale).relu_()
            g = _max_pool_backward(grad[a : a + step], y, _max_pool(y)[1], torch.empty_like(y))
            _aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
            return c, g

        gb, gw = torch.zeros_like(mean), torch.zeros_like(mean)
        for a in range(0, x.shape[0], step):  # first pass: the two sums of BN backward
            c, g = output_grad(a)
            gb += g.sum(dims)
            gw += g.mul_(c.sub_(m).mul_(i)).sum(dims)
        total = x.shape[0] * (ctx.per_image // (conv_w.shape[0] * x.element_size()))  # values per channel
        g_x = torch.empty_like(x) if need_x else None
        g_cw = torch.zeros_like(conv_w) if need_w else None
        for a in range(0, x.shape[0], step):  # second pass: BN's input gradient, then the convolution's
            c, g = output_grad(a)
            xhat = c.sub_(m).mul_(i)
            g.sub_((gb / total).view(per_channel)).sub_(xhat.mul_((gw / total).view(per_channel))).mul_(scale)
            del c, xhat
            gi, gwi = _conv0_grads(g, x[a : a + step], conv_w, conv, need_x, need_w)
            if need_x:
                g_x[a : a + step] = gi
            if need_w:
                g_cw += gwi
        return g_x, g_cw, gw, gb, None, None, None


def fused_stem(conv: nn.Module, norm: nn.Module, x: Tensor, keep_output: bool = True) -> Tensor:
    """The ImageNet stem in training, conv-BN (batch statistics, running statistics updated once)-
    ReLU-3x3/2 max pool (every spatial side), keeping the convolution's output for backward
    (``keep_output``, the fast mode) or only ``x`` (the memory-efficient mode); call only when
    :func:`can_fuse_stem` holds for ``x`` with ``conv`` a plain bias-free convolution."""
    return _Stem.apply(x, conv.weight, norm.weight, norm.bias, conv, norm, keep_output)
