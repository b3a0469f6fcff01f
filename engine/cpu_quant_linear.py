"""Few-row linears (a decode step's matmuls) computed from the weights' GGUF quantization
(Q4_1, Q8_0) instead of a float32 copy, on engine.cpu_pool.

A decode step on CPU streams every weight from memory once; in float32 that is 540 MB a step on
SmolLM2, and the step waits on memory, not on arithmetic. A GGUF model's weights are quantized
to begin with: Q4_1 stores 32 weights as 4-bit codes with a float16 scale and minimum
(w = d * q + m), Q8_0 as int8 codes with a scale (w = q * d). Every float32 weight the engine
computes with is exactly such a value (engine.cpu_dequant dequantizes as gguf's own code does,
bit for bit), so this kernel reads the codes (blocked with float32 scales: 6 and 9 bits a
weight against 32; the file's own are 5 and 8.5) and rebuilds each weight in registers with
the same float32 operations, in the same order and unfused, before the same accumulation as
engine.cpu_linear_pool: its outputs are bit-identical to that kernel's on the dequantized
weight, and greedy output is unchanged. More rows than one tile (MR) rebuild a
block's weights once into the thread's scratch and run the float32 tile over them.

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
from pantry.common.c_library import KernelLibrary, compile_library

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
""" + cpu_pool.C_POOL_TYPES + cpu_linear_pool.FLOAT_TILE + cpu_pool.C_THREAD_SCRATCH + r"""
#define GROUP 32
#define Q4_1 1
#define Q8_0 2
typedef int32_t vi __attribute__((vector_size(VW * 4)));

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
        for (int v = 0; v < NV; v++)
            w[v] = opaque(__builtin_convertvector(widen_s8(codes + v * VW), vf) * d[v]);
    }
}

/* Group g of a block's codes q: its scales (minimums) and where its codes start. */
INLINE const uint8_t *group(const uint8_t *q, int64_t g, vf *d, vf *m, const int fmt)
{
    const uint8_t *grp = q + g * (head_bytes(fmt) + GROUP * code_bytes(fmt));
    const float *scales = (const float *)grp;
    for (int v = 0; v < NV; v++) {
        d[v] = ld(scales + v * VW);
        m[v] = fmt == Q4_1 ? ld(scales + BW + v * VW) : splat(0.f);
    }
    return grp + head_bytes(fmt);
}

/* BODY for every input k of a block's codes q, with wv[NV] its BW weights rebuilt. */
#define EACH_INPUT(q, in, fmt, BODY)                                            \
    for (int64_t g_ = 0; g_ < (in) / GROUP; g_++) {                             \
        vf d_[NV], m_[NV];                                                      \
        const uint8_t *codes_ = group(q, g_, d_, m_, fmt);                      \
        for (int kk_ = 0; kk_ < GROUP; kk_++) {                                 \
            vf wv[NV];                                                          \
            weights(fmt, codes_ + kk_ * code_bytes(fmt), d_, m_, wv);           \
            const int64_t k = g_ * GROUP + kk_;                                 \
            BODY                                                                \
        }                                                                       \
    }

/* float_tile's sums, each weight rebuilt from the codes as it is needed. */
INLINE void quant_tile(const float *x, const uint8_t *q, const float *b, float *y, int64_t in,
                       int64_t out, int64_t f, const int nr, const int fmt)
{
    vf acc[MR][NV];
    start_tile(acc, b, nr);
    EACH_INPUT(q, in, fmt, {
        for (int a = 0; a < nr; a++) {
            const vf xa = splat(x[a * in + k]);
            for (int v = 0; v < NV; v++) acc[a][v] += wv[v] * xa;
        }
    })
    store_tile(acc, y, out, f, nr);
}

/* A block's weights rebuilt into w [in][BW], float_tile's layout. */
INLINE void rebuild(const uint8_t *q, float *w, int64_t in, const int fmt)
{
    EACH_INPUT(q, in, fmt, {
        for (int v = 0; v < NV; v++) st(w + k * BW + v * VW, wv[v]);
    })
}

/* x [rows, in]; w: the blocks (module docstring), `block_bytes` each; bias NULL or
   [blocks * BW]; y [rows, out]. */
typedef struct {
    const float *x, *bias;
    const uint8_t *w;
    float *y;
    int64_t rows, in, out, block_bytes;
} job_t;

INLINE void rows_of(const job_t *j, int64_t blk, const int fmt)
{
    const uint8_t *q = j->w + blk * j->block_bytes;
    const float *b = j->bias ? j->bias + blk * BW : NULL;
    float *w;
    if (j->rows > MR && (w = scratch_for(j->in * BW)) != NULL) {
        /* More rows than one tile: each weight rebuilt once into this thread's scratch, which
           every row group then reads from cache. */
        rebuild(q, w, j->in, fmt);
#define TILE(r, nr) float_tile(j->x + (r) * j->in, w, b, j->y + (r) * j->out, j->in, j->out, \
                               blk * BW, nr)
        EACH_ROW_TILE(j->rows, TILE)
#undef TILE
        return;
    }
#define TILE(r, nr) quant_tile(j->x + (r) * j->in, q, b, j->y + (r) * j->out, j->in, j->out, \
                               blk * BW, nr, fmt)
    EACH_ROW_TILE(j->rows, TILE)
#undef TILE
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
    pantry_run_blocks(run, fmt == Q4_1 ? block_q4_1 : block_q8_0, &job, n);
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
