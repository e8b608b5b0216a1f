"""Per-channel elementwise kernels of the fast path, fused by TorchInductor where a C++ compiler is found.

Outside its matrix products and convolutions, a dense block's training step is a chain of
per-channel passes over (M, C) matrices (M = batch x positions): BN1-ReLU of each layer's
prefix in forward and again in backward, then the ReLU mask, two column sums and the update of
the accumulated BN1 gradient. Each pass reads and writes the whole matrix, and on a CPU with
bfloat16 matrix units these passes, not the arithmetic, take most of the step
(``python bench/profile_step.py``). ``torch.compile`` fuses each chain into one loop over memory.

Every function here has an eager form (plain PyTorch ops, the reference, used on small matrices,
off the CPU, under an outer ``torch.compile``, and wherever compilation is unavailable) and a
compiled form used for bfloat16/float16 matrices of at least ``MIN_NUMEL`` elements (in float32 the
whole step measured no faster; the tests compile the float64 forms to check the arithmetic).
Compilation happens once per process and dtype (about 20 s, cached on disk by Inductor); shapes
are dynamic, so every layer and block shares the same kernels. The compiled forms compute in
float32 and round once, so they are at least as precise as the eager chain.

``DENSENET_FUSED=0`` (or :func:`set_enabled`) turns the compiled forms off.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import cpu_kernels
from .sync_bn import bn_backward, bn_factor, update_running

__all__ = ["add_per_channel", "as_nchw", "as_rows", "bn_input_backward", "bn_relu", "bn_relu_backward", "bn_relu_pool_train",
           "bn_relu_pool_train_backward", "bn_relu_recompute", "bn_relu_train", "bn_relu_train_backward", "colsum",
           "compiled_for", "enabled", "float32_status", "normalise", "set_enabled", "status", "store_maps", "vec"]

MIN_NUMEL = 1 << 14  # smaller matrices run eagerly (2^18 measured 3-4% slower on BC-40 and BC-100 steps, 2026-12-06)
# dtypes whose matrices take the compiled forms: in float32 the whole BC-100 step measured no faster
# (48.2 against 49.8 images/s on 2026-12-05, docs/speed.md says how to repeat it), so float32/64 keep the eager chain
COMPILED_DTYPES = (torch.bfloat16, torch.float16)
_aten = torch.ops.aten
_state: dict[str, Any] = {"enabled": None, "compiled": {}, "ok": set()}  # ok: kernels that compiled


def _compiler_found() -> bool:
    """Whether Inductor's C++ compiler is on PATH (``$CXX``, else g++, c++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names)


def enabled() -> bool:
    """Whether the compiled forms are used (``DENSENET_FUSED`` unset or 1, and a C++ compiler found)."""
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("DENSENET_FUSED", "1") != "0" and _compiler_found()
    return bool(_state["enabled"])


def float32_status() -> str:
    """What the plan line says of a float32 CPU run's kernels: the hand-written AVX2 ones where they run."""
    if not enabled():
        return status()
    if cpu_kernels.runs_for(torch.float32):
        return "hand-written AVX2 CPU kernels"
    return "eager CPU kernels (no AVX2, or DENSENET_CPU_KERNELS=0)"


def status() -> str:
    """One line for the plan: whether the fused kernels are on, and if not why."""
    if enabled():
        return "fused CPU kernels (compiled at the first step)"
    if os.environ.get("DENSENET_FUSED", "1") == "0":
        return "unfused CPU kernels (DENSENET_FUSED=0)"
    if not _compiler_found():
        return "unfused CPU kernels (no C++ compiler found; Debian: apt install g++)"
    return "unfused CPU kernels"


def set_enabled(on: bool | None) -> None:
    """Turn the compiled forms on or off for this process (None: back to the environment's choice)."""
    _state["enabled"] = on


def _runs(x: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return (x.device.type == "cpu" and x.dtype in dtypes and x.numel() >= MIN_NUMEL and enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting())


def _use_compiled(x: Tensor) -> bool:
    return _runs(x, COMPILED_DTYPES)


def _use_hand(x: Tensor) -> bool:
    """Whether :mod:`.cpu_kernels` are asked first for ``x`` (they take bfloat16 and float32 where the CPU
    has their instructions, and decline the rest): where the compiled forms run, and float32, which has none."""
    return _runs(x, (*COMPILED_DTYPES, torch.float32))


def compiled_for(x: Tensor) -> bool:
    """Whether the compiled forms run for the matrix ``x`` (its dtype, size, device, the switch)."""
    return _use_compiled(x)


class _CompileSettings:
    """Dynamo's settings for these kernels while one runs: no "duck sizing" (sizes that happen to be
    equal on the first call, a layer's width and another's, must not become one symbol, or every
    layer would compile its own kernel) and room for the variants that dtypes and sizes of 1 make.
    Set and restored by hand: ``config.patch`` builds a class per call (about 50 us, a few ms a step)."""

    SETTINGS = (("fx", "use_duck_shape", False), ("dynamo", "recompile_limit", 64),
                ("dynamo", "accumulated_recompile_limit", 512))

    def __enter__(self) -> None:
        modules = {"fx": torch.fx.experimental._config, "dynamo": torch._dynamo.config}
        self.saved = [(modules[m], key, getattr(modules[m], key)) for m, key, _ in self.SETTINGS]
        for (module, key, _), (_, _, value) in zip(self.saved, self.SETTINGS):
            setattr(module, key, value)

    def __exit__(self, *exc: object) -> None:
        for module, key, value in self.saved:
            setattr(module, key, value)


def _call(name: str, fn: Callable[..., Any], eager: Callable[..., Any] | None, *args: Any) -> Any:
    """``fn(*args)`` compiled (once per process and dtype; dynamic shapes). If that fails, ``eager(*args)``
    (or None): a kernel that never compiled is turned off for the process, with one warning."""
    compiled = _state["compiled"]
    if name not in compiled:
        # Inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every
        # CPU-only machine: nothing a CPU user can act on
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # every rounding to bfloat16 written here done, not skipped as a no-op (a map's centre is its
        # mean rounded to the buffer's dtype); compiled in this process: a pool of compile workers
        # would hold the CPU through the next steps
        compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True,
                                       options={"emulate_precision_casts": True, "compile_threads": 1})
    try:
        with torch.no_grad(), _CompileSettings():
            out = compiled[name](*args)
        _state["ok"].add(name)
        return out
    except Exception as e:  # noqa: BLE001  (a broken toolchain must not stop training: warn once, run eagerly)
        if name not in _state["ok"]:
            warnings.warn(f"densenet: the fused CPU kernels could not be compiled ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running the unfused kernels "
                          "(slower). Install a C++ compiler (Debian: apt install g++) or set DENSENET_FUSED=0 "
                          "to silence this.", RuntimeWarning, stacklevel=3)
            _state["enabled"] = False
        return None if eager is None else eager(*args)


def as_rows(t: Tensor) -> Tensor:
    """(N, C, *spatial) tensor -> (N * positions, C) matrix (a view when t is channels_last)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def as_nchw(t2d: Tensor, n: int, spatial: Sequence[int]) -> Tensor:
    """(N * positions, C) row-major matrix -> (N, C, *spatial) channels_last view."""
    return t2d.view(n, *spatial, -1).movedim(-1, 1)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


ROW_BLOCK = 256  # rows summed together first by the compiled column sums


def _sum_rows(x: Tensor) -> Tensor:
    """Column sums of an (M, C) matrix inside a compiled kernel, in two stages: blocks of ROW_BLOCK
    rows, then the blocks. Inductor's CPU code for a one-stage sum over rows ran 3-7x slower than a
    copy of the same bytes; the two-stage one runs at about the copy's speed (bench/bench_colsum.py)."""
    m, c = x.shape
    whole = m - m % ROW_BLOCK
    if whole == 0:
        return x.sum(0)
    s = x[:whole].reshape(whole // ROW_BLOCK, ROW_BLOCK, c).sum(1).sum(0)
    return s if whole == m else s + x[whole:].sum(0)


def _mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of an (M, C) matrix inside a compiled kernel, in one pass over
    it: moments of the differences from its first row, so that a mean far from zero costs no precision
    (the first row lies within a few standard deviations of the mean)."""
    m = x.shape[0]
    d = x - x[0]
    s1 = _sum_rows(d) / m
    return x[0] + s1, (_sum_rows(d * d) / m - s1 * s1).clamp_min(0)


def vec(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector in ``like``'s dtype: elementwise kernels with operands of two dtypes
    take a slow path (about 10x for bfloat16 on the CPU), so statistics and BN weights meet a
    bfloat16 matrix in bfloat16."""
    return v.to(like.dtype)


def colsum(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel sums of an (M, C) matrix (or any layout whose last dimension is the channel) as a
    ``dtype`` vector. A bfloat16/float16 matrix is summed in its own dtype (accumulated in float32 by
    the kernel, the result rounded once): a sum with ``dtype=float32`` would first convert the
    whole matrix, several times slower on the CPU than the sum itself."""
    return rows.sum(tuple(range(rows.dim() - 1))).to(dtype)


def normalise(rows: Tensor, offset: Tensor, invstd: Tensor, out: Tensor | None = None) -> Tensor:
    """x_hat = (rows - offset) * invstd per channel, in rows' dtype (``offset`` is small in a
    centred buffer, so folding it into one multiply-add loses nothing there)."""
    if _use_hand(rows):
        out = torch.empty(rows.shape, dtype=rows.dtype) if out is None else out
        if cpu_kernels.normalise(rows, offset, invstd, out) is not None:
            return out
    if _use_compiled(rows):
        return _call("normalise", _normalise_fused, _normalise_eager, rows, offset, invstd, out)
    return _normalise_eager(rows, offset, invstd, out)


def _normalise_eager(rows: Tensor, offset: Tensor, invstd: Tensor, out: Tensor | None) -> Tensor:
    if rows.dtype == offset.dtype:
        return torch.sub(rows, offset, out=out).mul_(invstd)
    return torch.addcmul(vec(-offset * invstd, rows), rows, vec(invstd, rows), out=out)


def _normalise_fused(rows: Tensor, offset: Tensor, invstd: Tensor, out: Tensor) -> Tensor:
    acc = _acc(rows.dtype)
    return out.copy_((rows.to(acc) - offset.to(acc)) * invstd.to(acc))


def _add_fused(rows: Tensor, v: Tensor) -> Tensor:
    return (rows.to(_acc(rows.dtype)) + v.to(_acc(rows.dtype))).to(rows.dtype)


def add_per_channel(rows: Tensor, v: Tensor) -> Tensor:
    """rows + v, an (M, C) matrix plus a per-channel vector of its dtype, as a new contiguous matrix
    (rounded once, as the eager sum)."""
    if _use_compiled(rows):
        out = _call("add_per_channel", _add_fused, None, rows, v)
        if out is not None:
            return out
    return rows + v


def _bn_relu_eager(rows: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None) -> Tensor:
    return torch.addcmul(shift, rows, scale, out=out).relu_()


def _bn_relu_fused(rows: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    acc = _acc(rows.dtype)
    return out.copy_(torch.relu(rows.to(acc) * scale.to(acc) + shift.to(acc)))


def bn_relu(rows: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """relu(rows * scale + shift) of an (M, C) matrix (possibly a strided channel prefix), per-channel
    ``scale`` and ``shift`` in rows' dtype; into ``out`` (M, C) when given. One pass when fused."""
    if _use_hand(rows):
        out = torch.empty(rows.shape, dtype=rows.dtype) if out is None else out
        if cpu_kernels.bn_relu(rows, scale, shift, out) is not None:
            return out
    if _use_compiled(rows):
        return _call("bn_relu", _bn_relu_fused, _bn_relu_eager, rows, scale, shift, out)
    return _bn_relu_eager(rows, scale, shift, out)


def _bn_relu_backward_eager(g_t: Tensor, t: Tensor, xhat: Tensor | None, prefix: Tensor, offset: Tensor,
                            invstd: Tensor, gw: Tensor, weight: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g_a = _aten.threshold_backward.grad_input(g_t, t, 0, grad_input=g_t)
    g_bias = colsum(g_a, stat_dtype)
    gw.addcmul_(g_a, vec(weight, g_a))
    if xhat is None:  # t is no longer needed: its memory takes x_hat
        xhat = normalise(prefix, offset, invstd, out=t)
    return g_bias, colsum(g_a.mul_(xhat), stat_dtype)


def _bn_relu_backward_fused(g_t: Tensor, t: Tensor, xhat: Tensor | None, prefix: Tensor, offset: Tensor,
                            invstd: Tensor, gw: Tensor, weight: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    acc = _acc(g_t.dtype)
    g_a = torch.where(t > 0, g_t.to(acc), 0.0)
    if xhat is None:
        xh = (prefix.to(acc) - offset.to(acc)) * invstd.to(acc)
    else:
        xh = xhat.to(acc)
    gw.copy_((gw.to(acc) + g_a * weight.to(g_t.dtype).to(acc)).to(gw.dtype))
    return _sum_rows(g_a).to(stat_dtype), _sum_rows(g_a * xh).to(stat_dtype)


def bn_relu_backward(g_t: Tensor, t: Tensor, xhat: Tensor | None, prefix: Tensor, offset: Tensor, invstd: Tensor,
                     gw: Tensor, weight: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Backward of t = relu(BN(prefix)) for the BN's affine parameters, given the gradient g_t of t.

    With g_a = g_t where t > 0 (M, C): adds g_a * ``weight`` (the BN's weight, per channel) to ``gw``
    (M, C, the gradient of the normalised maps summed over every reader) and returns the gradients
    of the BN's bias and weight, sum(g_a) and sum(g_a * x_hat) per channel, as ``stat_dtype``
    vectors. ``xhat`` is the normalised prefix, or None to compute it from ``prefix``, ``offset``
    (the batch mean of the stored values) and ``invstd``. May overwrite ``g_t`` and ``t``."""
    if _use_hand(g_t):
        sums = cpu_kernels.bn_relu_backward(g_t, t, xhat, prefix, offset, invstd, gw, weight, stat_dtype)
        if sums is not None:
            return sums
    if _use_compiled(g_t):
        # detached: the compiler takes a Parameter's shape as fixed, which would compile once per layer
        return _call("bn_relu_backward", _bn_relu_backward_fused, _bn_relu_backward_eager,
                     g_t, t, xhat, prefix, offset, invstd, gw, weight.detach(), stat_dtype)
    return _bn_relu_backward_eager(g_t, t, xhat, prefix, offset, invstd, gw, weight, stat_dtype)


def _bn_relu_train_eager(z: Tensor, weight: Tensor, bias: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    u, mean, invstd = _aten.native_batch_norm(z, weight, bias, norm.running_mean, norm.running_var, True,
                                              bn_factor(norm), norm.eps)
    return u.relu_(), mean, invstd


def _bn_relu_apply(z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """relu(BN(z)) given the statistics, computed in the accumulation dtype: one expression shared by
    the training forward and the memory-efficient mode's recompute, so that both round alike."""
    acc = _acc(z.dtype)
    return torch.relu((z.to(acc) - mean.to(acc)) * (invstd.to(acc) * weight.to(acc)) + bias.to(acc)).to(z.dtype)


def _bn_relu_train_fused(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean, var = _mean_var(z.to(_acc(z.dtype)))
    invstd = torch.rsqrt(var + eps)
    r = _bn_relu_apply(z, mean, invstd, weight, bias)
    return r, mean.to(weight.dtype), invstd.to(weight.dtype), var.to(weight.dtype)


def _bn_relu_recompute_fused(z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                             out: Tensor) -> Tensor:
    return out.copy_(_bn_relu_apply(z, mean, invstd, weight, bias))


def bn_relu_recompute(z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                      out: Tensor) -> Tensor | None:
    """The output of :func:`bn_relu_train` again, bit for bit, from its input ``z`` (M, C) and the
    batch ``mean`` and ``invstd`` it returned, into ``out`` (M, C); None (nothing written) where
    :func:`bn_relu_train` would not have run compiled for ``z``."""
    if not _use_compiled(z):
        return None
    return _call("bn_relu_recompute", _bn_relu_recompute_fused, None, z, mean, invstd, weight.detach(),
                 bias.detach(), out)


def bn_relu_train(z: Tensor, weight: Tensor, bias: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """relu(BatchNorm(z)) of a channels_last (N, C, *spatial) tensor with batch statistics, updating
    ``norm``'s running statistics as ``nn.BatchNorm`` does. Returns (output shaped like z, batch
    mean (C,), 1/sqrt(var + eps) (C,))."""
    if _use_compiled(z) and _channels_last(z):
        rows = as_rows(z)
        out = _call("bn_relu_train", _bn_relu_train_fused, None, rows, weight.detach(), bias.detach(), float(norm.eps))
        if out is not None:
            r, mean, invstd, var = out
            update_running(norm, mean, var, rows.shape[0])
            return as_nchw(r, z.shape[0], z.shape[2:]), mean, invstd
    return _bn_relu_train_eager(z, weight, bias, norm)


def _bn_relu_train_backward_eager(g_r: Tensor, r: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    g_u = _aten.threshold_backward(g_r, r, 0)
    return tuple(_aten.native_batch_norm_backward(g_u, z, weight, None, None, mean, invstd, True, eps,
                                                  [True, True, True]))


def _bn_relu_train_backward_fused(g_r: Tensor, r: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc(z.dtype)
    m = z.shape[0]
    g_u = torch.where(r > 0, g_r.to(acc), 0.0)
    zhat = (z.to(acc) - mean.to(acc)) * invstd.to(acc)
    g_b = _sum_rows(g_u)
    g_w = _sum_rows(g_u * zhat)
    g_z = (g_u - g_b / m - zhat * (g_w / m)) * (invstd.to(acc) * weight.to(acc))
    return g_z.to(z.dtype), g_w.to(weight.dtype), g_b.to(weight.dtype)


def bn_relu_train_backward(g_r: Tensor, r: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of r = relu(BatchNorm(z)) with batch statistics, (N, C, *spatial) tensors: returns
    the gradients of z (shaped like z), of the BN weight and of its bias, given the gradient ``g_r`` of r."""
    if _use_hand(z) and all(_channels_last(t) for t in (g_r, r, z)):
        rows = (as_rows(g_r), as_rows(r), as_rows(z))
        out = cpu_kernels.bn_relu_train_backward(*rows, mean, invstd, weight)
        if out is None and _use_compiled(z):
            out = _call("bn_relu_train_backward", _bn_relu_train_backward_fused, None, *rows, mean, invstd,
                        weight.detach(), eps)
        if out is not None:
            return as_nchw(out[0], z.shape[0], z.shape[2:]), out[1], out[2]
    return _bn_relu_train_backward_eager(g_r, r, z, mean, invstd, weight, eps)


def _channels_last(t: Tensor) -> bool:
    """Whether (N, C, *spatial) t is stored channel-last, so that its (M, C) rows are a view."""
    return t.movedim(1, -1).is_contiguous()


def _bn_input_backward_eager(gy: Tensor, xhat: Tensor, invstd: Tensor, direct: Tensor, total: int) -> Tensor:
    return bn_backward(gy, xhat, invstd, None, total, None, False)[0].add_(direct)


def _bn_input_backward_fused(gy: Tensor, xhat: Tensor, invstd: Tensor, direct: Tensor, total: int) -> Tensor:
    acc = _acc(gy.dtype)
    g = gy.to(acc)
    xh = xhat.to(acc)
    mean_g = _sum_rows(g) / total
    mean_gx = _sum_rows(g * xh) / total
    return ((g - mean_g - xh * mean_gx) * invstd.to(acc) + direct.to(acc)).to(gy.dtype)


def bn_input_backward(gy: Tensor, xhat: Tensor, invstd: Tensor, direct: Tensor, total: int) -> Tensor:
    """Gradient of a BatchNorm's input (batch statistics over ``total`` values per channel, this
    process only), ``gy`` being the gradient of its normalised output x_hat, plus ``direct`` (the
    gradient reaching the input by other paths); (M, C) matrices, returned contiguous in gy's dtype."""
    if _use_hand(gy):
        out = cpu_kernels.bn_input_backward(gy, xhat, invstd, direct, total)
        if out is not None:
            return out
    if _use_compiled(gy):
        return _call("bn_input_backward", _bn_input_backward_fused, _bn_input_backward_eager, gy, xhat, invstd,
                     direct, total)
    return _bn_input_backward_eager(gy, xhat, invstd, direct, total)


def _store_maps_fused(rows: Tensor, out: Tensor, centred: bool, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    acc = _acc(rows.dtype)
    x = rows.to(acc)
    mean, var = _mean_var(x)
    if centred:  # less the mean rounded to the buffer's dtype (its "centre")
        out.copy_((x - mean.to(rows.dtype).to(acc)).to(out.dtype))
    else:
        out.copy_(rows)
    return mean.to(stat_dtype), var.to(stat_dtype)


def store_maps(rows: Tensor, out: Tensor, centred: bool, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """New maps (M, C) into the block buffer's slice ``out`` (less their batch mean rounded to the
    buffer's dtype when ``centred``), returning their batch mean and biased variance (``stat_dtype``
    vectors); in one fused pass, or None (nothing written) where the compiled form is not used."""
    if not _use_compiled(out):
        return None
    return _call("store_maps", _store_maps_fused, None, rows.detach(), out, centred, stat_dtype)


def _pool_input_ok(x: Tensor) -> bool:
    """A channels_last (N, C, H, W) tensor with even H and W: the 2x2 pool's layout here."""
    return x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and _channels_last(x)


def _bn_pre_relu(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """BN(x) before the ReLU in the accumulation dtype; forward and backward share it to mask alike."""
    acc = _acc(x.dtype)
    return (x.to(acc) - mean.to(acc)) * (invstd.to(acc) * weight.to(acc)) + bias.to(acc)


def _bn_relu_pool_fused(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, h, w, c = x.shape  # (N, H, W, C)
    mean, var = _mean_var(x.reshape(n * h * w, c).to(_acc(x.dtype)))
    invstd = torch.rsqrt(var + eps)
    y = torch.relu(_bn_pre_relu(x, mean, invstd, weight, bias))
    out = y.view(n, h // 2, 2, w // 2, 2, c).mean((2, 4)).to(x.dtype)
    return out, mean.to(weight.dtype), invstd.to(weight.dtype), var.to(weight.dtype)


def _bn_relu_pool_backward_fused(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                 invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, h, w, c = x.shape  # x (N, H, W, C), grad (N, H / 2, W / 2, C)
    acc = _acc(x.dtype)
    up = grad.to(acc).view(n, h // 2, 1, w // 2, 1, c).expand(n, h // 2, 2, w // 2, 2, c).reshape(n, h, w, c)
    g = torch.where(_bn_pre_relu(x, mean, invstd, weight, bias) > 0, up * 0.25, 0.0)
    xhat = (x.to(acc) - mean.to(acc)) * invstd.to(acc)
    g_b = _sum_rows(g.reshape(-1, c))
    g_w = _sum_rows((g * xhat).reshape(-1, c))
    m = n * h * w
    g_x = (g - g_b / m - xhat * (g_w / m)) * (invstd.to(acc) * weight.to(acc))
    return g_x.to(x.dtype), g_w.to(weight.dtype), g_b.to(weight.dtype)


def bn_relu_pool_train(x: Tensor, weight: Tensor, bias: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
    """avg_pool2d(relu(BatchNorm(x)), 2) of a channels_last (N, C, H, W) tensor with even H and W, with
    batch statistics (``norm``'s running ones updated): (output (N, C, H / 2, W / 2), batch mean,
    1/sqrt(var + eps)), or None (nothing done) where the compiled form does not run."""
    if not (_use_compiled(x) and _pool_input_ok(x)):
        return None
    out = _call("bn_relu_pool", _bn_relu_pool_fused, None, x.permute(0, 2, 3, 1), weight.detach(), bias.detach(),
                float(norm.eps))
    if out is None:
        return None
    y, mean, invstd, var = out
    update_running(norm, mean, var, x.numel() // x.shape[1])
    return y.permute(0, 3, 1, 2), mean, invstd


def bn_relu_pool_train_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                invstd: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Gradients of x, of the BN weight and of its bias for :func:`bn_relu_pool_train`, given the
    gradient ``grad`` of its output; None where the compiled form does not run."""
    if not (_use_compiled(x) and _pool_input_ok(x)):
        return None
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    out = _call("bn_relu_pool_backward", _bn_relu_pool_backward_fused, None, grad.permute(0, 2, 3, 1),
                x.permute(0, 2, 3, 1), weight.detach(), bias.detach(), mean, invstd)
    if out is None:
        return None
    return out[0].permute(0, 3, 1, 2), out[1], out[2]
