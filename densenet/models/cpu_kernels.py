"""Hand-written CPU kernels for the per-channel passes of the fast path: AVX-512 for bfloat16, AVX2 for float32.

**bfloat16** (``bench/bench_cpu_kernels.py``; the per-kernel split in ``docs/speed.md``): on a 2-core
AMD EPYC (Zen 4, AVX512_BF16, no AMX) Inductor's CPU code for the
fused per-channel passes ran 3-5x slower than a copy of the same bytes wherever the matrix fits in
the cache or its rows are narrow: it rounds float32 to bfloat16 with eight integer instructions per
vector (no ``vcvtneps2bf16``), loops row by row with a tail test per row, and a call through Dynamo
costs about 25 us. The kernels here do the same arithmetic (float32 inside, one rounding, round to
nearest even) with the processor's bfloat16 conversion, at about 1 us per call.

**float32** (AVX2 and FMA, every x86-64 CPU of the last decade; the training precision of a CPU without
bfloat16 instructions): PyTorch's eager chain makes one pass over memory per operation (a layer's BN1
backward is a mask, a multiply-add, a product and two column sums: five passes) and the compiled forms
measured no faster there. The kernels here make one pass (two where a result needs the sums first), with
the eager chain's arithmetic: one multiply-add where PyTorch's ``addcmul`` makes one, and column sums in
float32 per thread, over blocks of 256 rows first: a 65,536-row sum off by about 2e-7 relative, PyTorch's
pairwise sum by 1e-7, a plain running float32 sum per thread by 4e-6.

- :func:`bn_relu`: relu(x * scale + shift) of a (possibly strided) (M, C) matrix;
- :func:`normalise`: (x - offset) * invstd, the recomputed x_hat;
- :func:`bn_relu_backward`: the backward of a layer's BN1-ReLU over its prefix (the BN's parameter
  gradients and the accumulated gradient of the normalised maps), in one pass;
- :func:`bn_relu_train_backward`: the backward of a layer's BN2-ReLU (batch statistics), two passes;
- :func:`bn_input_backward`: the BatchNorm input gradient of a layer's new maps, narrow strided
  (M, k) slices of the block's buffers (the worst case for Inductor: 0.7 GB/s).

They are compiled once per machine and dtype (under a second, cached by Inductor's C++ cache) through
Inductor's own C++ binding builder, so they need nothing more than the fused kernels do: a C++
compiler. They run on bfloat16 CPU matrices on processors with AVX512_BF16 and on float32 ones on
processors with AVX2; everywhere else (and with ``DENSENET_CPU_KERNELS=0``) the callers in :mod:`.fused`
keep their compiled or eager forms.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["available", "bn_input_backward", "bn_relu", "bn_relu_backward", "bn_relu_train_backward", "normalise",
           "runs_for", "set_enabled"]

_ADD_PARTIALS = r"""
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
""" + _ADD_PARTIALS

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

_F32_PRELUDE = r"""
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#define TARGET __attribute__((target("avx2,fma")))
#define ROWS 256  // rows summed into a block's own sums first, then added to the thread's: float32 sums of
                  // 256 + M / 256 terms instead of M (a 65,536-row sum: 2e-7 relative error instead of 4e-6)
TARGET static inline __m256i lanes_below(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(n, 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// the 8 floats at p, or the first n < 8 of them (the others 0)
TARGET static inline __m256 ld(const float* p, int64_t n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(n));
}
TARGET static inline void st(float* p, __m256 v, int64_t n) {
    if (n >= 8) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, lanes_below(n), v);
}
TARGET static inline void acc(float* s, __m256 v) { _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), v)); }
// a block's sums (2 * cp floats) into the thread's, then cleared
TARGET static inline void flush(float* blk, float* s, int64_t cp) {
    for (int64_t j = 0; j < 2 * cp; j += 8) {
        acc(s + j, _mm256_loadu_ps(blk + j));
        _mm256_storeu_ps(blk + j, _mm256_setzero_ps());
    }
}
""" + _ADD_PARTIALS

_F32_BN_RELU = _F32_PRELUDE + r"""
// relu(x * scale + shift), one multiply-add (as torch.addcmul), NaN kept (as torch.relu)
extern "C" TARGET void kernel(const float* x, const float* scale, const float* shift, float* out,
                              int64_t m, int64_t c, int64_t ldx, int64_t ldo) {
    const __m256 zero = _mm256_setzero_ps();
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < c; j += 8) {
            const int64_t n = c - j;
            __m256 v = _mm256_fmadd_ps(ld(x + i * ldx + j, n), ld(scale + j, n), ld(shift + j, n));
            st(out + i * ldo + j, _mm256_max_ps(zero, v), n);
        }
    }
}
"""

_F32_NORMALISE = _F32_PRELUDE + r"""
extern "C" TARGET void kernel(const float* x, const float* offset, const float* invstd, float* out,
                              int64_t m, int64_t c, int64_t ldx, int64_t ldo) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < c; j += 8) {
            const int64_t n = c - j;
            st(out + i * ldo + j, _mm256_mul_ps(_mm256_sub_ps(ld(x + i * ldx + j, n), ld(offset + j, n)), ld(invstd + j, n)), n);
        }
    }
}
"""

_F32_BN_RELU_BACKWARD = _F32_PRELUDE + r"""
// g_a = g_t where t > 0; gw += g_a * weight (one multiply-add, as addcmul_); sums[0] = sum(g_a),
// sums[1] = sum(g_a * x_hat) per channel, x_hat = xh if has_xhat else (prefix - offset) * invstd
extern "C" TARGET void kernel(const float* gt, const float* t, const float* xh, const float* offset,
                              const float* invstd, float* gw, const float* weight, float* sums, int64_t m, int64_t c,
                              int64_t ldgt, int64_t ldt, int64_t ldx, int64_t ldw, int64_t has_xhat) {
    const int64_t cp = (c + 7) / 8 * 8, nb = (m + ROWS - 1) / ROWS;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);
    const __m256 zero = _mm256_setzero_ps();
    #pragma omp parallel num_threads(nt)
    {
        float* s = part.data() + (size_t)omp_get_thread_num() * 2 * cp;
        std::vector<float> blk(2 * cp, 0.0f);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t i = b * ROWS; i < std::min(m, (b + 1) * ROWS); ++i) {
                for (int64_t j = 0; j < c; j += 8) {
                    const int64_t n = c - j;
                    __m256 g = _mm256_and_ps(ld(gt + i * ldgt + j, n), _mm256_cmp_ps(ld(t + i * ldt + j, n), zero, _CMP_GT_OQ));
                    __m256 x = ld(xh + i * ldx + j, n);
                    if (!has_xhat) x = _mm256_mul_ps(_mm256_sub_ps(x, ld(offset + j, n)), ld(invstd + j, n));
                    float* w = gw + i * ldw + j;
                    st(w, _mm256_fmadd_ps(g, ld(weight + j, n), ld(w, n)), n);
                    acc(blk.data() + j, g);
                    acc(blk.data() + cp + j, _mm256_mul_ps(g, x));
                }
            }
            flush(blk.data(), s, cp);
        }
    }
    add_partials(part, nt, c, cp, sums, sums + c);
}
"""

_F32_BN_INPUT_BACKWARD = _F32_PRELUDE + r"""
// out = (g - sum(g) / total - xh * sum(g * xh) / total) * invstd + direct, per channel
extern "C" TARGET void kernel(const float* g, const float* xh, const float* invstd, const float* direct,
                              float* out, int64_t m, int64_t c, int64_t ldg, int64_t ldx, int64_t ldd,
                              int64_t total) {
    const int64_t cp = (c + 7) / 8 * 8, nb = (m + ROWS - 1) / ROWS;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);  // per thread: sum(g), then sum(g * xh)
    std::vector<float> coef(2 * cp, 0.0f);
    #pragma omp parallel num_threads(nt)
    {
        float* s = part.data() + (size_t)omp_get_thread_num() * 2 * cp;
        std::vector<float> blk(2 * cp, 0.0f);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t i = b * ROWS; i < std::min(m, (b + 1) * ROWS); ++i) {
                for (int64_t j = 0; j < c; j += 8) {
                    const int64_t n = c - j;
                    __m256 gv = ld(g + i * ldg + j, n);
                    acc(blk.data() + j, gv);
                    acc(blk.data() + cp + j, _mm256_mul_ps(gv, ld(xh + i * ldx + j, n)));
                }
            }
            flush(blk.data(), s, cp);
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
            for (int64_t j = 0; j < c; j += 8) {
                const int64_t n = c - j;
                __m256 d = _mm256_sub_ps(_mm256_sub_ps(ld(g + i * ldg + j, n), _mm256_loadu_ps(coef.data() + j)),
                                         _mm256_mul_ps(ld(xh + i * ldx + j, n), _mm256_loadu_ps(coef.data() + cp + j)));
                st(out + i * c + j, _mm256_add_ps(_mm256_mul_ps(d, ld(invstd + j, n)), ld(direct + i * ldd + j, n)), n);
            }
        }
    }
}
"""

_F32_BN_RELU_TRAIN_BACKWARD = _F32_PRELUDE + r"""
// r = relu(BN(z)) with batch statistics: g_u = g_r where r > 0, zhat = (z - mean) * invstd,
// sums[0] = sum(g_u), sums[1] = sum(g_u * zhat), g_z = (g_u - sums[0] / m - zhat * sums[1] / m) * (invstd * weight)
TARGET static inline void grad_and_zhat(const float* gr, const float* r, const float* z, const float* mean,
                                        const float* invstd, int64_t e, int64_t j, int64_t n, __m256& g, __m256& zh) {
    g = _mm256_and_ps(ld(gr + e, n), _mm256_cmp_ps(ld(r + e, n), _mm256_setzero_ps(), _CMP_GT_OQ));
    zh = _mm256_mul_ps(_mm256_sub_ps(ld(z + e, n), ld(mean + j, n)), ld(invstd + j, n));
}

extern "C" TARGET void kernel(const float* gr, const float* r, const float* z, const float* mean,
                              const float* invstd, const float* weight, float* gz, float* sums, int64_t m, int64_t c) {
    const int64_t cp = (c + 7) / 8 * 8, nb = (m + ROWS - 1) / ROWS;
    const int nt = omp_get_max_threads();
    std::vector<float> part((size_t)nt * 2 * cp, 0.0f);
    std::vector<float> coef(3 * cp, 0.0f);  // sum(g_u) / m, sum(g_u * zhat) / m, invstd * weight
    #pragma omp parallel num_threads(nt)
    {
        float* s = part.data() + (size_t)omp_get_thread_num() * 2 * cp;
        std::vector<float> blk(2 * cp, 0.0f);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t i = b * ROWS; i < std::min(m, (b + 1) * ROWS); ++i) {
                for (int64_t j = 0; j < c; j += 8) {
                    __m256 g, zh;
                    grad_and_zhat(gr, r, z, mean, invstd, i * c + j, j, c - j, g, zh);
                    acc(blk.data() + j, g);
                    acc(blk.data() + cp + j, _mm256_mul_ps(g, zh));
                }
            }
            flush(blk.data(), s, cp);
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
            for (int64_t j = 0; j < c; j += 8) {
                const int64_t n = c - j;
                __m256 g, zh;
                grad_and_zhat(gr, r, z, mean, invstd, i * c + j, j, n, g, zh);
                __m256 d = _mm256_sub_ps(_mm256_sub_ps(g, _mm256_loadu_ps(coef.data() + j)),
                                         _mm256_mul_ps(zh, _mm256_loadu_ps(coef.data() + cp + j)));
                st(gz + i * c + j, _mm256_mul_ps(d, _mm256_loadu_ps(coef.data() + 2 * cp + j)), n);
            }
        }
    }
}
"""

_SIGNATURES = {  # name: argument types, T being the matrices' element type
    "bn_relu_train_backward": ["const T*", "const T*", "const T*", "const float*", "const float*", "const float*", "T*",
                               "float*"] + ["int64_t"] * 2,
    "bn_relu_backward": ["const T*", "const T*", "const T*", "const float*", "const float*", "T*", "const float*",
                         "float*"] + ["int64_t"] * 7,
    "normalise": ["const T*", "const float*", "const float*", "T*"] + ["int64_t"] * 4,
    "bn_relu": ["const T*", "const float*", "const float*", "T*"] + ["int64_t"] * 4,
    "bn_input_backward": ["const T*", "const T*", "const float*", "const T*", "T*"] + ["int64_t"] * 6,
}
# per dtype: the C type of its elements, whether this CPU runs the kernels, and their sources
_SOURCES = {
    torch.bfloat16: ("uint16_t", torch.cpu._is_avx512_bf16_supported,
                     {"bn_relu_train_backward": _BN_RELU_TRAIN_BACKWARD, "bn_relu_backward": _BN_RELU_BACKWARD,
                      "normalise": _NORMALISE, "bn_relu": _BN_RELU, "bn_input_backward": _BN_INPUT_BACKWARD}),
    torch.float32: ("float", torch.cpu._is_avx2_supported,
                    {"bn_relu_train_backward": _F32_BN_RELU_TRAIN_BACKWARD, "bn_relu_backward": _F32_BN_RELU_BACKWARD,
                     "normalise": _F32_NORMALISE, "bn_relu": _F32_BN_RELU, "bn_input_backward": _F32_BN_INPUT_BACKWARD}),
}
_state: dict[str, Any] = {"enabled": None, "kernels": {}, "broken": set(), "cpu": {}}  # broken: dtypes whose build failed


def set_enabled(on: bool | None) -> None:
    """Turn these kernels on or off for this process (None: back to the environment's choice)."""
    _state["enabled"] = on


def _enabled() -> bool:
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("DENSENET_CPU_KERNELS", "1") != "0"
    return bool(_state["enabled"])


def _cpu_runs(dtype: torch.dtype) -> bool:
    """Whether this processor has the instructions of ``dtype``'s kernels (AVX512_BF16, or AVX2 and FMA)."""
    if dtype not in _state["cpu"]:
        _state["cpu"][dtype] = dtype in _SOURCES and bool(_SOURCES[dtype][1]())
    return _state["cpu"][dtype]


def runs_for(dtype: torch.dtype) -> bool:
    """Whether the kernels of ``dtype`` run in this process: switched on, this CPU has their instructions,
    and they have not failed to build."""
    return _enabled() and _cpu_runs(dtype) and dtype not in _state["broken"]


def available(*ts: Tensor) -> bool:
    """Whether the kernels run for these matrices: CPU (M, C) matrices of one dtype with unit channel
    stride, bfloat16 on a processor with AVX512_BF16 or float32 on one with AVX2, and the kernels
    switched on."""
    dtype = ts[0].dtype
    return (runs_for(dtype)
            and all(t.device.type == "cpu" and t.dtype == dtype and t.dim() == 2 and t.stride(1) == 1 for t in ts))


def _kernel(name: str, dtype: torch.dtype) -> Callable[..., None] | None:
    """The compiled kernel for ``dtype``, or None (with one warning, that dtype's kernels then off) if it
    does not build."""
    kernels = _state["kernels"]
    if (name, dtype) not in kernels:
        # Inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every
        # CPU-only machine (as in .fused)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            # imported on first use, not with the package: Inductor's import takes seconds
            from torch._inductor.codecache import CppPythonBindingsCodeCache
            ctype, _, sources = _SOURCES[dtype]
            argtypes = [a.replace("T", ctype) for a in _SIGNATURES[name]]
            kernels[name, dtype] = CppPythonBindingsCodeCache.load_pybinding(argtypes, sources[name])
        except Exception as e:  # noqa: BLE001  (a broken toolchain must not stop training)
            warnings.warn(f"densenet: the hand-written {dtype} CPU kernels could not be built ({type(e).__name__}); "
                          "running the fused or eager kernels instead. Set DENSENET_CPU_KERNELS=0 to silence this.",
                          RuntimeWarning, stacklevel=3)
            _state["broken"].add(dtype)
            return None
    return kernels[name, dtype]


def _ready(name: str, *ts: Tensor) -> Callable[..., None] | None:
    """The kernel ``name`` if it runs for these matrices (:func:`available`, all of one shape), else None."""
    if not (available(*ts) and all(t.shape == ts[0].shape for t in ts)):
        return None
    return _kernel(name, ts[0].dtype)


def bn_relu(rows: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor | None:
    """relu(rows * scale + shift) of an (M, C) matrix into the (M, C) matrix ``out``, per-channel
    ``scale`` and ``shift`` (any float dtype); None (nothing written) where the kernel does not run."""
    k = _ready("bn_relu", rows, out)
    if k is None:
        return None
    k(rows, scale.float().contiguous(), shift.float().contiguous(), out, rows.shape[0], rows.shape[1],
      rows.stride(0), out.stride(0))
    return out


def normalise(rows: Tensor, offset: Tensor, invstd: Tensor, out: Tensor) -> Tensor | None:
    """(rows - offset) * invstd of an (M, C) matrix into the (M, C) matrix ``out``; None (nothing
    written) where the kernel does not run."""
    k = _ready("normalise", rows, out)
    if k is None:
        return None
    k(rows, offset.float().contiguous(), invstd.float().contiguous(), out, rows.shape[0], rows.shape[1],
      rows.stride(0), out.stride(0))
    return out


def bn_input_backward(gy: Tensor, xhat: Tensor, invstd: Tensor, direct: Tensor, total: int) -> Tensor | None:
    """As :func:`.fused.bn_input_backward` for (M, C) matrices: a new contiguous (M, C) matrix, or None where
    the kernel does not run."""
    k = _ready("bn_input_backward", gy, xhat, direct)
    if k is None:
        return None
    out = torch.empty(gy.shape, dtype=gy.dtype)
    k(gy, xhat, invstd.float().contiguous(), direct, out, gy.shape[0], gy.shape[1], gy.stride(0), xhat.stride(0),
      direct.stride(0), int(total))
    return out


def bn_relu_backward(g_t: Tensor, t: Tensor, xhat: Tensor | None, prefix: Tensor, offset: Tensor, invstd: Tensor,
                     gw: Tensor, weight: Tensor, stat_dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """As :func:`.fused.bn_relu_backward` for (M, C) matrices (``gw`` updated in place, the BN's ``weight``
    rounded to their dtype first as there); None (nothing written) where the kernel does not run."""
    x = prefix if xhat is None else xhat
    k = _ready("bn_relu_backward", g_t, t, x, gw)
    if k is None:
        return None
    m, c = g_t.shape
    sums = torch.empty(2, c, dtype=torch.float32)
    k(g_t, t, x, offset.float().contiguous(), invstd.float().contiguous(), gw,
      weight.detach().to(g_t.dtype).float().contiguous(), sums, m, c, g_t.stride(0), t.stride(0), x.stride(0),
      gw.stride(0), int(xhat is not None))
    return sums[0].to(stat_dtype), sums[1].to(stat_dtype)


def bn_relu_train_backward(g_r: Tensor, r: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """As :func:`.fused.bn_relu_train_backward` on contiguous (M, C) matrices: (gradient of z as a
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
