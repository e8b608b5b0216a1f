"""Hand-written AVX-512 kernels for the bfloat16 passes where TorchInductor's code is slowest.

Measured (``bench/bench_cpu_kernels.py``; the per-kernel split in ``docs/speed.md``): on a 2-core
AMD EPYC (Zen 4, AVX512_BF16, no AMX) Inductor's CPU code for the
fused per-channel passes ran 3-5x slower than a copy of the same bytes wherever the matrix fits in
the cache or its rows are narrow: it rounds float32 to bfloat16 with eight integer instructions per
vector (no ``vcvtneps2bf16``), loops row by row with a tail test per row, and a call through Dynamo
costs about 25 us. The kernels here do the same arithmetic (float32 inside, one rounding, round to
nearest even) with the processor's bfloat16 conversion, at about 1 us per call:

- :func:`bn_relu`: relu(x * scale + shift) of a (possibly strided) (M, C) bfloat16 matrix;
- :func:`normalise`: (x - offset) * invstd, the memory-efficient mode's recomputed x_hat;
- :func:`bn_relu_backward`: the backward of a layer's BN1-ReLU over its prefix (the BN's parameter
  gradients and the accumulated gradient of the normalised maps), in one pass;
- :func:`bn_relu_train_backward`: the backward of a layer's BN2-ReLU (batch statistics), two passes;
- :func:`bn_input_backward`: the BatchNorm input gradient of a layer's new maps, narrow strided
  (M, k) slices of the block's buffers (the worst case for Inductor: 0.7 GB/s).

They are compiled once per machine (under a second, cached by Inductor's C++ cache) through
Inductor's own C++ binding builder, so they need nothing more than the fused kernels do: a C++
compiler. They run only on bfloat16 CPU matrices on processors with AVX512_BF16; everywhere else
(and with ``DENSENET_CPU_KERNELS=0``) the callers in :mod:`.fused` keep their compiled or eager forms.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["available", "bn_input_backward", "bn_relu", "bn_relu_backward", "bn_relu_train_backward", "normalise",
           "set_enabled"]

_PRELUDE = r"""
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <vector>
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
TARGET static inline __m512 load_bf16(const uint16_t* p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
TARGET static inline void store_bf16(uint16_t* p, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
// per channel j < c, the nt threads' partial sums (blocks of 2 * cp floats: one sum, then another)
// added in a fixed order, so that the result is deterministic for a thread count: into a[j] and b[j]
static inline void add_partials(const std::vector<float>& part, int nt, int64_t c, int64_t cp, float* a, float* b) {
    for (int64_t j = 0; j < c; ++j) {
        float sa = 0.0f, sb = 0.0f;
        for (int u = 0; u < nt; ++u) { sa += part[(size_t)u * 2 * cp + j]; sb += part[(size_t)u * 2 * cp + cp + j]; }
        a[j] = sa;
        b[j] = sb;
    }
}
"""

_BN_RELU = _PRELUDE + r"""
extern "C" TARGET void kernel(const uint16_t* x, const float* scale, const float* shift, uint16_t* out,
                              int64_t m, int64_t c, int64_t ldx, int64_t ldo) {
    const __m512 zero = _mm512_setzero_ps();
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        const uint16_t* xr = x + i * ldx;
        uint16_t* o = out + i * ldo;
        for (int64_t j = 0; j < c; j += 16) {
            __mmask16 k = tail_mask(c - j);
            // a product then a sum, two roundings, as Inductor's kernel (compiled without fp-contraction)
            __m512 v = _mm512_add_ps(_mm512_mul_ps(load_bf16(xr + j, k), _mm512_maskz_loadu_ps(k, scale + j)),
                                     _mm512_maskz_loadu_ps(k, shift + j));
            store_bf16(o + j, _mm512_max_ps(v, zero), k);
        }
    }
}
"""

_NORMALISE = _PRELUDE + r"""
extern "C" TARGET void kernel(const uint16_t* x, const float* offset, const float* invstd, uint16_t* out,
                              int64_t m, int64_t c, int64_t ldx, int64_t ldo) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < c; j += 16) {
            __mmask16 k = tail_mask(c - j);
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(load_bf16(x + i * ldx + j, k), _mm512_maskz_loadu_ps(k, offset + j)),
                                     _mm512_maskz_loadu_ps(k, invstd + j));
            store_bf16(out + i * ldo + j, v, k);
        }
    }
}
"""

_BN_INPUT_BACKWARD = _PRELUDE + r"""
// out = (g - sum(g) / total - xh * sum(g * xh) / total) * invstd + direct, per channel
extern "C" TARGET void kernel(const uint16_t* g, const uint16_t* xh, const float* invstd, const uint16_t* direct,
                              uint16_t* out, int64_t m, int64_t c, int64_t ldg, int64_t ldx, int64_t ldd,
                              int64_t total) {
    const int64_t cp = (c + 15) / 16 * 16;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);  // per thread: sum(g), then sum(g * xh)
    std::vector<float> coef(2 * cp, 0.0f);
    #pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num();
        float* s = part.data() + (size_t)t * 2 * cp;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < c; j += 16) {
                __mmask16 k = tail_mask(c - j);
                __m512 gv = load_bf16(g + i * ldg + j, k);
                __m512 xv = load_bf16(xh + i * ldx + j, k);
                _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j), gv));
                _mm512_storeu_ps(s + cp + j, _mm512_fmadd_ps(gv, xv, _mm512_loadu_ps(s + cp + j)));
            }
        }
        #pragma omp barrier
        #pragma omp single
        {
            add_partials(part, nt, c, cp, coef.data(), coef.data() + cp);
            for (int64_t j = 0; j < c; ++j) {
                coef[j] = (float)(coef[j] / (double)total);
                coef[cp + j] = (float)(coef[cp + j] / (double)total);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < c; j += 16) {
                __mmask16 k = tail_mask(c - j);
                __m512 gv = load_bf16(g + i * ldg + j, k);
                __m512 xv = load_bf16(xh + i * ldx + j, k);
                __m512 d = _mm512_sub_ps(_mm512_sub_ps(gv, _mm512_loadu_ps(coef.data() + j)),
                                         _mm512_mul_ps(xv, _mm512_loadu_ps(coef.data() + cp + j)));
                __m512 r = _mm512_add_ps(_mm512_mul_ps(d, _mm512_maskz_loadu_ps(k, invstd + j)),
                                         load_bf16(direct + i * ldd + j, k));
                store_bf16(out + i * c + j, r, k);
            }
        }
    }
}
"""

_BN_RELU_BACKWARD = _PRELUDE + r"""
// g_a = g_t where t > 0; gw += g_a * weight (rounded to bfloat16); sums[0] = sum(g_a), sums[1] = sum(g_a * x_hat)
// per channel, x_hat = xh if has_xhat else (prefix - offset) * invstd
extern "C" TARGET void kernel(const uint16_t* gt, const uint16_t* t, const uint16_t* xh, const float* offset,
                              const float* invstd, uint16_t* gw, const float* weight, float* sums, int64_t m, int64_t c,
                              int64_t ldgt, int64_t ldt, int64_t ldx, int64_t ldw, int64_t has_xhat) {
    const int64_t cp = (c + 15) / 16 * 16;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);
    const __m512 zero = _mm512_setzero_ps();
    #pragma omp parallel num_threads(nt)
    {
        float* s = part.data() + (size_t)omp_get_thread_num() * 2 * cp;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < c; j += 16) {
                __mmask16 k = tail_mask(c - j);
                __m512 g = load_bf16(gt + i * ldgt + j, k);
                __mmask16 pos = _mm512_cmp_ps_mask(load_bf16(t + i * ldt + j, k), zero, _CMP_GT_OQ);
                g = _mm512_maskz_mov_ps(pos, g);
                __m512 x = load_bf16(xh + i * ldx + j, k);
                if (!has_xhat)
                    x = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(k, offset + j)),
                                      _mm512_maskz_loadu_ps(k, invstd + j));
                uint16_t* w = gw + i * ldw + j;
                store_bf16(w, _mm512_add_ps(load_bf16(w, k), _mm512_mul_ps(g, _mm512_maskz_loadu_ps(k, weight + j))), k);
                _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j), g));
                _mm512_storeu_ps(s + cp + j, _mm512_add_ps(_mm512_loadu_ps(s + cp + j), _mm512_mul_ps(g, x)));
            }
        }
    }
    add_partials(part, nt, c, cp, sums, sums + c);
}
"""

_BN_RELU_TRAIN_BACKWARD = _PRELUDE + r"""
// r = relu(BN(z)) with batch statistics: g_u = g_r where r > 0, zhat = (z - mean) * invstd,
// sums[0] = sum(g_u), sums[1] = sum(g_u * zhat), g_z = (g_u - sums[0] / m - zhat * sums[1] / m) * (invstd * weight)
// g = g_r where r > 0 (else 0) and zh = zhat at element e of the rows, channels j..j+15 (mask k)
TARGET static inline void grad_and_zhat(const uint16_t* gr, const uint16_t* r, const uint16_t* z, const float* mean,
                                        const float* invstd, int64_t e, int64_t j, __mmask16 k, __m512& g, __m512& zh) {
    __mmask16 pos = _mm512_cmp_ps_mask(load_bf16(r + e, k), _mm512_setzero_ps(), _CMP_GT_OQ);
    g = _mm512_maskz_mov_ps(pos, load_bf16(gr + e, k));
    zh = _mm512_mul_ps(_mm512_sub_ps(load_bf16(z + e, k), _mm512_maskz_loadu_ps(k, mean + j)),
                       _mm512_maskz_loadu_ps(k, invstd + j));
}

extern "C" TARGET void kernel(const uint16_t* gr, const uint16_t* r, const uint16_t* z, const float* mean,
                              const float* invstd, const float* weight, uint16_t* gz, float* sums, int64_t m, int64_t c) {
    const int64_t cp = (c + 15) / 16 * 16;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);
    std::vector<float> coef(3 * cp, 0.0f);  // sum(g_u) / m, sum(g_u * zhat) / m, invstd * weight
    #pragma omp parallel num_threads(nt)
    {
        float* s = part.data() + (size_t)omp_get_thread_num() * 2 * cp;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < c; j += 16) {
                __mmask16 k = tail_mask(c - j);
                __m512 g, zh;
                grad_and_zhat(gr, r, z, mean, invstd, i * c + j, j, k, g, zh);
                _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j), g));
                _mm512_storeu_ps(s + cp + j, _mm512_add_ps(_mm512_loadu_ps(s + cp + j), _mm512_mul_ps(g, zh)));
            }
        }
        #pragma omp barrier
        #pragma omp single
        {
            add_partials(part, nt, c, cp, sums, sums + c);
            for (int64_t j = 0; j < c; ++j) {
                coef[j] = sums[j] / (float)m;
                coef[cp + j] = sums[c + j] / (float)m;
                coef[2 * cp + j] = invstd[j] * weight[j];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < c; j += 16) {
                __mmask16 k = tail_mask(c - j);
                __m512 g, zh;
                grad_and_zhat(gr, r, z, mean, invstd, i * c + j, j, k, g, zh);
                __m512 d = _mm512_sub_ps(_mm512_sub_ps(g, _mm512_loadu_ps(coef.data() + j)),
                                         _mm512_mul_ps(zh, _mm512_loadu_ps(coef.data() + cp + j)));
                store_bf16(gz + i * c + j, _mm512_mul_ps(d, _mm512_loadu_ps(coef.data() + 2 * cp + j)), k);
            }
        }
    }
}
"""

_SIGNATURES = {
    "bn_relu_train_backward": (_BN_RELU_TRAIN_BACKWARD, ["const uint16_t*", "const uint16_t*", "const uint16_t*",
                                                         "const float*", "const float*", "const float*", "uint16_t*",
                                                         "float*", "int64_t", "int64_t"]),
    "bn_relu_backward": (_BN_RELU_BACKWARD, ["const uint16_t*", "const uint16_t*", "const uint16_t*", "const float*",
                                             "const float*", "uint16_t*", "const float*", "float*"] + ["int64_t"] * 7),
    "normalise": (_NORMALISE, ["const uint16_t*", "const float*", "const float*", "uint16_t*",
                               "int64_t", "int64_t", "int64_t", "int64_t"]),
    "bn_relu": (_BN_RELU, ["const uint16_t*", "const float*", "const float*", "uint16_t*",
                           "int64_t", "int64_t", "int64_t", "int64_t"]),
    "bn_input_backward": (_BN_INPUT_BACKWARD, ["const uint16_t*", "const uint16_t*", "const float*", "const uint16_t*",
                                               "uint16_t*", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t",
                                               "int64_t"]),
}
_state: dict[str, Any] = {"enabled": None, "kernels": {}, "broken": False}  # broken: a build failed


def set_enabled(on: bool | None) -> None:
    """Turn these kernels on or off for this process (None: back to the environment's choice)."""
    _state["enabled"] = on


def _enabled() -> bool:
    if _state["enabled"] is None:
        _state["enabled"] = (os.environ.get("DENSENET_CPU_KERNELS", "1") != "0"
                             and bool(torch.cpu._is_avx512_bf16_supported()))
    return bool(_state["enabled"])


def available(*ts: Tensor) -> bool:
    """Whether the kernels run for these matrices: bfloat16 CPU (M, C) matrices with unit channel
    stride, on a processor with AVX512_BF16, and the kernels switched on."""
    return _enabled() and not _state["broken"] and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 2
                              and t.stride(1) == 1 for t in ts)


def _kernel(name: str) -> Callable[..., None] | None:
    """The compiled kernel, or None (with one warning, the kernels then off) if it does not build."""
    kernels = _state["kernels"]
    if name not in kernels:
        try:
            # imported on first use, not with the package: Inductor's import takes seconds
            from torch._inductor.codecache import CppPythonBindingsCodeCache
            source, argtypes = _SIGNATURES[name]
            kernels[name] = CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
        except Exception as e:  # noqa: BLE001  (a broken toolchain must not stop training)
            warnings.warn(f"densenet: the AVX-512 CPU kernels could not be built ({type(e).__name__}); "
                          "running Inductor's fused kernels instead. Set DENSENET_CPU_KERNELS=0 to silence this.",
                          RuntimeWarning, stacklevel=3)
            _state["broken"] = True
            return None
    return kernels[name]


def _ready(name: str, *ts: Tensor) -> Callable[..., None] | None:
    """The kernel ``name`` if it runs for these matrices (:func:`available`, all of one shape), else None."""
    if not (available(*ts) and all(t.shape == ts[0].shape for t in ts)):
        return None
    return _kernel(name)


def bn_relu(rows: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor | None:
    """relu(rows * scale + shift) of a bfloat16 (M, C) matrix into the (M, C) matrix ``out``, per-channel
    ``scale`` and ``shift`` (any float dtype); None (nothing written) where the kernel does not run."""
    k = _ready("bn_relu", rows, out)
    if k is None:
        return None
    k(rows, scale.float().contiguous(), shift.float().contiguous(), out, rows.shape[0], rows.shape[1],
      rows.stride(0), out.stride(0))
    return out


def normalise(rows: Tensor, offset: Tensor, invstd: Tensor, out: Tensor) -> Tensor | None:
    """(rows - offset) * invstd of a bfloat16 (M, C) matrix into the (M, C) matrix ``out``; None (nothing
    written) where the kernel does not run."""
    k = _ready("normalise", rows, out)
    if k is None:
        return None
    k(rows, offset.float().contiguous(), invstd.float().contiguous(), out, rows.shape[0], rows.shape[1],
      rows.stride(0), out.stride(0))
    return out


def bn_input_backward(gy: Tensor, xhat: Tensor, invstd: Tensor, direct: Tensor, total: int) -> Tensor | None:
    """As :func:`.fused.bn_input_backward` for bfloat16 (M, C) matrices: a new contiguous (M, C) matrix,
    or None where the kernel does not run."""
    k = _ready("bn_input_backward", gy, xhat, direct)
    if k is None:
        return None
    out = torch.empty(gy.shape, dtype=gy.dtype)
    k(gy, xhat, invstd.float().contiguous(), direct, out, gy.shape[0], gy.shape[1], gy.stride(0), xhat.stride(0),
      direct.stride(0), int(total))
    return out


def bn_relu_backward(g_t: Tensor, t: Tensor, xhat: Tensor | None, prefix: Tensor, offset: Tensor, invstd: Tensor,
                     gw: Tensor, weight: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """As :func:`.fused.bn_relu_backward` for bfloat16 (M, C) matrices (``gw`` updated in place, the BN's
    ``weight`` rounded to bfloat16 first as there); None (nothing written) where the kernel does not run."""
    x = prefix if xhat is None else xhat
    k = _ready("bn_relu_backward", g_t, t, x, gw)
    if k is None:
        return None
    m, c = g_t.shape
    sums = torch.empty(2, c, dtype=torch.float32)
    k(g_t, t, x, offset.float().contiguous(), invstd.float().contiguous(), gw,
      weight.detach().to(torch.bfloat16).float().contiguous(), sums, m, c, g_t.stride(0), t.stride(0), x.stride(0),
      gw.stride(0), int(xhat is not None))
    return sums[0].to(stat_dtype), sums[1].to(stat_dtype)


def bn_relu_train_backward(g_r: Tensor, r: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """As :func:`.fused.bn_relu_train_backward` on contiguous bfloat16 (M, C) matrices: (gradient of z as a
    new (M, C) matrix, of the BN weight, of its bias, the last two in ``weight``'s dtype), or None."""
    k = _ready("bn_relu_train_backward", g_r, r, z) if all(t.is_contiguous() for t in (g_r, r, z)) else None
    if k is None:
        return None
    m, c = z.shape
    g_z = torch.empty(m, c, dtype=z.dtype)
    sums = torch.empty(2, c, dtype=torch.float32)
    k(g_r, r, z, mean.float().contiguous(), invstd.float().contiguous(), weight.detach().float().contiguous(), g_z, sums,
      m, c)
    return g_z, sums[1].to(weight.dtype), sums[0].to(weight.dtype)
