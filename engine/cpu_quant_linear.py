"""Few-row linears (a decode step's matmuls) computed from the weights' GGUF quantization
(Q4_1, Q8_0) instead of a float32 copy, on engine.cpu_pool.

A decode step on CPU streams every weight from memory once; in float32 that is 540 MB a step on
SmolLM2, and the step waits on memory, not on arithmetic. A GGUF model's weights are quantized
to begin with: Q4_1 stores 32 weights as 4-bit codes with a float16 scale and minimum
(w = d * q + m), Q8_0 as int8 codes with a scale (w = q * d). Every float32 weight the engine
computes with is exactly such a value (engine.gguf_file dequantizes with gguf's own code), so
this kernel reads the codes (5 and 8.5 bits a weight against 32) and rebuilds each weight in
registers with the same float32 operations, in the same order and unfused, before the same
accumulation as engine.cpu_linear_pool: its outputs are bit-identical to that kernel's on the
dequantized weight, and greedy output is unchanged.

The layout (`pack`) follows engine.cpu_linear_pool's: blocks of BW output features, each a
run of groups of 32 inputs; a group is the features' scales (and minimums) as float32, then
per input the features' codes: Q8_0 one byte each, Q4_1 BW/2 bytes whose low nibbles are the
first BW/2 features and high nibbles the rest.

`available()` is False where engine.cpu_linear_pool is, or with PANTRY_CPU_QUANT_LINEAR=0:
weights then keep their float32 copy.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine import cpu_linear_pool, cpu_pool
from engine.gguf_file import GROUP, Q4_1, Q8_0, QuantRows
from engine.kernel_build import KernelLibrary, compile_library

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
""" + cpu_pool.C_POOL_TYPES + r"""
/* The same register blocking as the float32 kernel (engine/cpu_linear_pool.py). */
#if defined(__AVX512F__)
#define VW 16
#define NV 4
#else
#define VW 8
#define NV 2
#endif
#define BW (NV * VW)
#define MR 6
#define GROUP 32
#define Q4_1 1
#define Q8_0 2
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf ld(const float *p) { return *(const vfu *)p; }
INLINE void st(float *p, vf v) { *(vfu *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }
/* A value the compiler may not fuse into the next operation (-ffast-math would contract
   d * q + m into one FMA, or reassociate the weight into the accumulation): each weight is
   rounded exactly as gguf's numpy dequantization rounds it. */
INLINE vf opaque(vf v) { __asm__("" : "+x"(v)); return v; }

/* VW codes widened to 32 bits, in one instruction where the CPU has it (GCC's generic
   conversion of a byte vector goes one lane at a time). Nibbles are split after widening:
   x86 has no byte shifts. */
INLINE vi widen_u8(const uint8_t *p)
{
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi r;
    for (int i = 0; i < VW; i++) r[i] = p[i];
    return r;
#endif
}

INLINE vi widen_s8(const uint8_t *p)
{
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi r;
    for (int i = 0; i < VW; i++) r[i] = (int8_t)p[i];
    return r;
#endif
}

INLINE int code_bytes(const int fmt) { return fmt == Q4_1 ? BW / 2 : BW; }
INLINE int head_bytes(const int fmt) { return (fmt == Q4_1 ? 2 : 1) * BW * 4; }

/* The block's BW weights of one input, from its codes and the group's scales (minimums). */
INLINE void weights(const int fmt, const uint8_t *codes, const vf *d, const vf *m, vf *w)
{
    if (fmt == Q4_1) {
        for (int h = 0; h < NV / 2; h++) {
            const vi b = widen_u8(codes + h * VW);
            const vf lo = __builtin_convertvector(b & 15, vf);
            const vf hi = __builtin_convertvector(b >> 4, vf);
            w[h] = opaque(opaque(d[h] * lo) + m[h]);
            w[h + NV / 2] = opaque(opaque(d[h + NV / 2] * hi) + m[h + NV / 2]);
        }
    } else {
        for (int v = 0; v < NV; v++) {
            w[v] = opaque(__builtin_convertvector(widen_s8(codes + v * VW), vf) * d[v]);
        }
    }
}

/* x [rows, in]; w: the blocks (module docstring), `block_bytes` each; bias NULL or
   [blocks * BW]; y [rows, out]. */
typedef struct {
    const float *x, *bias;
    const uint8_t *w;
    float *y;
    int64_t rows, in, out, block_bytes;
} job_t;

INLINE void tile(const job_t *j, int64_t blk, int64_t r, const int nr, const int fmt)
{
    const int64_t in = j->in;
    const int cb = code_bytes(fmt), hb = head_bytes(fmt);
    const uint8_t *w = j->w + blk * j->block_bytes;
    const float *x = j->x + r * in;
    vf acc[MR][NV];
    for (int v = 0; v < NV; v++) {
        const vf b = j->bias ? ld(j->bias + blk * BW + v * VW) : splat(0.f);
        for (int a = 0; a < nr; a++) acc[a][v] = b;
    }
    for (int64_t g = 0; g < in / GROUP; g++) {
        const uint8_t *grp = w + g * (hb + GROUP * cb);
        const float *scales = (const float *)grp;
        vf d[NV], m[NV];
        for (int v = 0; v < NV; v++) {
            d[v] = ld(scales + v * VW);
            m[v] = fmt == Q4_1 ? ld(scales + BW + v * VW) : splat(0.f);
        }
        const uint8_t *codes = grp + hb;
        for (int kk = 0; kk < GROUP; kk++) {
            vf wv[NV];
            weights(fmt, codes + kk * cb, d, m, wv);
            const int64_t k = g * GROUP + kk;
            for (int a = 0; a < nr; a++) {
                const vf xa = splat(x[a * in + k]);
                for (int v = 0; v < NV; v++) acc[a][v] += wv[v] * xa;
            }
        }
    }
    const int64_t f = blk * BW, valid = j->out - f < BW ? j->out - f : BW;
    for (int a = 0; a < nr; a++) {
        float *y = j->y + (r + a) * j->out + f;
        if (valid == BW) {
            for (int v = 0; v < NV; v++) st(y + v * VW, acc[a][v]);
        } else {
            float tmp[BW];
            for (int v = 0; v < NV; v++) st(tmp + v * VW, acc[a][v]);
            memcpy(y, tmp, sizeof(float) * valid);
        }
    }
}

INLINE void rows_of(const job_t *j, int64_t blk, const int fmt)
{
    for (int64_t r = 0; r < j->rows;) {
        switch (j->rows - r) {
        case 1: tile(j, blk, r, 1, fmt); r += 1; break;
        case 2: tile(j, blk, r, 2, fmt); r += 2; break;
        case 3: tile(j, blk, r, 3, fmt); r += 3; break;
        case 4: tile(j, blk, r, 4, fmt); r += 4; break;
        case 5: tile(j, blk, r, 5, fmt); r += 5; break;
        default: tile(j, blk, r, MR, fmt); r += MR; break;
        }
    }
}

static void block_q4_1(const void *ctx, int64_t blk) { rows_of(ctx, blk, Q4_1); }
static void block_q8_0(const void *ctx, int64_t blk) { rows_of(ctx, blk, Q8_0); }

static pantry_run_fn run = NULL;

void pantry_qlinear_set_pool(pantry_run_fn fn) { run = fn; }

int pantry_qlinear_block(void) { return BW; }

void pantry_qlinear(int fmt, const float *x, const uint8_t *w, const float *bias, float *y,
                    int64_t rows, int64_t in, int64_t out, int64_t block_bytes)
{
    const int64_t n = (out + BW - 1) / BW;
    const job_t job = {x, bias, w, y, rows, in, out, block_bytes};
    void (*fn)(const void *, int64_t) = fmt == Q4_1 ? block_q4_1 : block_q8_0;
    if (run == NULL) {
        for (int64_t c = 0; c < n; c++) fn(&job, c);
        return;
    }
    run(fn, &job, n);
}
"""


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("quant_linear", _SOURCE, cpu_pool.C_FLAGS)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    handle.pantry_qlinear.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
    handle.pantry_qlinear.restype = None
    handle.pantry_qlinear_set_pool.argtypes = [ptr]
    handle.pantry_qlinear_set_pool.restype = None
    handle.pantry_qlinear_block.argtypes = []
    handle.pantry_qlinear_block.restype = ctypes.c_int
    handle.pantry_qlinear_set_pool(cpu_pool.run_function())
    return handle


_kernel = KernelLibrary("CPU quantized linear", "float32 weights", _build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_LINEAR_POOL",
                         "PANTRY_CPU_QUANT_LINEAR"))


def available() -> bool:
    return cpu_linear_pool.available() and _kernel.available()


@dataclass(frozen=True)
class QuantWeight:
    """A linear's quantized weight blocked for `linear` (module docstring), the bias padded to
    whole blocks as engine.cpu_linear_pool pads it."""

    fmt: int
    blocked: Tensor  # uint8, [blocks * block_bytes]
    block_bytes: int
    bias: Tensor | None
    in_features: int
    out_features: int


def pack(rows: QuantRows, bias: Tensor | None) -> QuantWeight:
    """The weight whose row i is `rows`' row i (its GGUF blocks), blocked for the kernel."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert rows.fmt in (Q4_1, Q8_0), rows.fmt
    bw = lib.pantry_qlinear_block()
    out, groups = rows.blocks.shape[:2]
    nb = -(-out // bw)
    raw = np.zeros((nb * bw, groups, rows.blocks.shape[2]), np.uint8)  # padding: all zero
    raw[:out] = rows.blocks

    def by_block(a: np.ndarray) -> np.ndarray:
        """[features, groups, ...] -> [blocks, groups, ..., BW]."""
        a = a.reshape(nb, bw, *a.shape[1:])
        return np.ascontiguousarray(np.moveaxis(a, 1, -1))

    d = by_block(raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if rows.fmt == Q4_1:
        m = by_block(raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        qs = raw[:, :, 4:]  # [features, groups, 16]: weight i low nibble, i + 16 high
        codes = np.concatenate([qs & 15, qs >> 4], axis=2)  # [features, groups, 32]
        codes = by_block(codes)  # [blocks, groups, 32, BW]
        codes = codes[..., : bw // 2] | (codes[..., bw // 2 :] << 4)
        parts = [d.view(np.uint8), m.view(np.uint8)]
    else:
        codes = by_block(raw[:, :, 2:])  # int8 codes as bytes, [blocks, groups, 32, BW]
        parts = [d.view(np.uint8)]
    parts.append(codes.reshape(nb, groups, -1))
    blocked = np.ascontiguousarray(np.concatenate(parts, axis=2)).reshape(nb, -1)
    padded_bias = None
    if bias is not None:
        padded_bias = torch.zeros(nb * bw)
        padded_bias[:out] = bias.detach()
    return QuantWeight(rows.fmt, torch.from_numpy(blocked.reshape(-1)), blocked.shape[1],
                       padded_bias, groups * GROUP, out)


def linear(x: Tensor, weight: QuantWeight) -> Tensor:
    """x [rows, in] float32, contiguous -> x @ W^T + bias, [rows, out]."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2
    assert x.shape[1] == weight.in_features
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    bias = weight.bias
    lib.pantry_qlinear(weight.fmt, x.data_ptr(), weight.blocked.data_ptr(),
                       None if bias is None else bias.data_ptr(), y.data_ptr(), x.shape[0],
                       x.shape[1], weight.out_features, weight.block_bytes)
    return y
