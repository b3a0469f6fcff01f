"""Paged decode attention on CPU, read in place from the paged KV cache.

The torch path (`engine.attention._decode`) gathers every decoding sequence's keys and values
out of the cache into new tensors for each layer, then calls SDPA: the gather copies the whole
context each layer of each step (a 4k-token sequence: ~180 MB a step for SmolLM2), so a step
slows down with every long sequence in the batch. This kernel reads each block where it lies,
on our own thread pool (engine.cpu_pool, as the step's linears): a long sequence is split into
spans, the pool's blocks, merged at the end (flash-decoding); within a span it goes sixteen
positions at a time (eight without AVX-512) with flash attention's online softmax, so a chunk's
K and V rows are read once, close together, while the next chunk's are prefetched. Head sizes
64 and 128 with up to 8 query heads per KV head get loops unrolled at compile time, a tile of
query heads in registers; any other shape runs the two-pass form in scalar loops. The same
role as the Triton kernel plays on CUDA.

It is C compiled on first use with the machine's C compiler (engine.kernel_build) and loaded
with ctypes. Where no compiler works, `available()` is False and the engine keeps the torch
path; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from engine import cpu_pool
from engine.kernel_build import C_EXP, KernelLibrary, compile_library

# Per span of up to SPAN positions of a sequence, per query head: the weighted sum of values,
# the max score and the sum of the exps; a sequence's spans merged by their max scores. Spans
# are the threads' work items.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
""" + cpu_pool.C_POOL_TYPES + r"""
/* One vector of floats (GCC/Clang vector extensions): sixteen, a zmm, where the CPU has
   AVX-512 (its 32 registers hold a tile of query heads' q rows or sums), else eight, a ymm.
   Loaded from and stored to any float address. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")
#define SH __builtin_shufflevector

INLINE vf ld(const float *p) { return *(const vfu *)p; }
INLINE void st(float *p, vf v) { *(vfu *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }
/* Halves added until four floats are left: GCC sums a loop over the lanes one by one. */
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
INLINE float hsum(vf v)
{
#if VW == 16
    const vf8 h = SH(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + SH(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    const vf8 h = v;
#endif
    vf4 x = SH(h, h, 0, 1, 2, 3) + SH(h, h, 4, 5, 6, 7);
    x += SH(x, x, 2, 3, 0, 1);
    return x[0] + x[1];
}
INLINE float hmax(vf v)
{
    float m = v[0];
    for (int i = 1; i < VW; i++) m = v[i] > m ? v[i] : m;
    return m;
}

""" + C_EXP + r"""
/* Scores -> exp(score - max) in place; the max and the sum of the exps out. */
static void exp_scores(float *s, int64_t n, float *max_out, float *sum_out)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
    vf acc = splat(0.f);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        const vf e = exp_nonpositive_bits(ld(s + i) - splat(m));
        st(s + i, e);
        acc += e;
    }
    float sum = hsum(acc);
    for (; i < n; i++) { s[i] = expf(s[i] - m); sum += s[i]; }
    *max_out = m;
    *sum_out = sum;
}

/* A position's row lies anywhere in the cache (each layer's part of a block is 12 KB for
   SmolLM2, blocks a whole block apart). The pass over a chunk for one KV head asks for the
   same head's K (and V) rows of the next chunk as it reads its own, so the requests are spread
   over the whole chunk's work and each arrives about a chunk ahead of its use. Into L2 (hint
   1): measured faster than into L1 (whose fill buffers are few) or than no prefetch; one
   thread over a 4k-token sequence, 30 layers: 17 ms, against 22 ms asking for whole rows
   (every head) during the first head's pass and 27 ms without. */
INLINE void prefetch(const float *p, int64_t floats)
{
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i, 0, 1);
}

/* Positions per work item: a long sequence is split over threads, its spans merged after. */
#define SPAN 512

typedef struct {
    const float *q, *k_base, *v_base;
    int64_t block_stride, token_stride, head_stride;
    const int64_t *table;
    int64_t max_blocks, heads, kv_heads, block_size;
    float scale;
} args_t;

/* VW vectors at m (VW positions' products of q and k, each to be summed) -> one vector whose
   lane j is the sum of vector j: halves of pairs added level by level, positions kept in
   order. Summing each vector alone would take log2(VW) shuffles per position and head. */
INLINE vf sums_of(const float *m)
{
    vf r[VW];
    for (int j = 0; j < VW; j++) r[j] = ld(m + j * VW);
#if VW == 16
    for (int j = 0; j < 8; j++)
        r[j] = SH(r[2 * j], r[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SH(r[2 * j], r[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15,
                  24, 25, 26, 27, 28, 29, 30, 31);
    for (int j = 0; j < 4; j++)
        r[j] = SH(r[2 * j], r[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SH(r[2 * j], r[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15,
                  20, 21, 22, 23, 28, 29, 30, 31);
    for (int j = 0; j < 2; j++)
        r[j] = SH(r[2 * j], r[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SH(r[2 * j], r[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15,
                  18, 19, 22, 23, 26, 27, 30, 31);
    return SH(r[0], r[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SH(r[0], r[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
    for (int j = 0; j < 4; j++)
        r[j] = SH(r[2 * j], r[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + SH(r[2 * j], r[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int j = 0; j < 2; j++)
        r[j] = SH(r[2 * j], r[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13)
             + SH(r[2 * j], r[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SH(r[0], r[1], 0, 2, 4, 6, 8, 10, 12, 14) + SH(r[0], r[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

/* Query heads of one KV head taken in one pass over a chunk's rows: as many as keep their q
   rows (for the scores) or their sums (for the values) in 8 registers. 16 kept SmolLM2's group
   of 3 in one pass but spilled a sum to the stack in the values' loop (GCC keeps the exps'
   constants in registers); 8 reads the chunk's rows twice, the second time from L1, and
   measured 3-5% faster over a cache in DRAM. */
#define TILE_REGS 8

/* Positions [s, e) of sequence b for every query head, one chunk of VW positions at a time
   (flash attention's online softmax within the span): for each KV head and tile of its query
   heads, the chunk's scores (products summed by sums_of), their max folded into the head's
   running max (rescaling its sums when it rises), their exps, then the values weighted into
   sums held in registers. A chunk's K and V rows are read once and close together in time;
   the next chunk's are prefetched meanwhile. `part` gets per query head the unnormalised sum
   of values (dim floats), then the max score and the sum of the exps. Inlined with constant
   dim and group: the loops unroll and a tile stays in registers. */
INLINE void attend_span(const args_t *a, int64_t b, int64_t s, int64_t e, float *part,
                        const int dim, const int group)
{
    const int nv = dim / VW, gt = TILE_REGS / nv < 1 ? 1 : TILE_REGS / nv;
    const int64_t n = e - s, bs = a->block_size, kvh = a->kv_heads, heads = a->heads;
    const int64_t stride = dim + 2;
    const int64_t *tab = a->table + b * a->max_blocks;
    const float *q = a->q + b * heads * dim;
    int64_t off[SPAN];  /* each position's row, from the base of K or V */
    for (int64_t p = s, blk = s / bs, t = s % bs; p < e; p++) {
        off[p - s] = tab[blk] * a->block_stride + t * a->token_stride;
        if (++t == bs) { t = 0; blk++; }
    }
    for (int64_t h = 0; h < heads; h++) {
        memset(part + h * stride, 0, sizeof(float) * dim);
        part[h * stride + dim] = -INFINITY;
        part[h * stride + dim + 1] = 0.f;
    }
    float prod[8 * VW * VW] __attribute__((aligned(64)));
    float w[8 * VW] __attribute__((aligned(64)));
    for (int64_t c = 0; c < n; c += VW) {
        const int64_t m = n - c < VW ? n - c : VW, next = c + VW;
        for (int64_t kh = 0; kh < kvh; kh++)
            _Pragma("GCC unroll 8") for (int g0 = 0; g0 < group; g0 += gt) {
                const int gn = group - g0 < gt ? group - g0 : gt;
                const int64_t h0 = kh * group + g0;
                vf qv[8][16], acc[8][16];
                UNROLL for (int g = 0; g < gn; g++)
                    UNROLL for (int i = 0; i < nv; i++)
                        qv[g][i] = ld(q + (h0 + g) * dim + i * VW);
                for (int64_t j = 0; j < m; j++) {
                    if (g0 == 0 && next + j < n)
                        prefetch(a->k_base + off[next + j] + kh * a->head_stride, dim);
                    const float *k = a->k_base + off[c + j] + kh * a->head_stride;
                    vf kv[16];
                    UNROLL for (int i = 0; i < nv; i++) kv[i] = ld(k + i * VW);
                    UNROLL for (int g = 0; g < gn; g++) {
                        vf s0 = qv[g][0] * kv[0], s1 = splat(0.f);
                        UNROLL for (int i = 1; i < nv; i += 2) {
                            s1 += qv[g][i] * kv[i];
                            if (i + 1 < nv) s0 += qv[g][i + 1] * kv[i + 1];
                        }
                        st(prod + (g * VW + j) * VW, s0 + s1);
                    }
                }
                /* A short last chunk: its missing positions summed as zeros, then masked. */
                for (int64_t j = m; j < VW; j++)
                    UNROLL for (int g = 0; g < gn; g++) st(prod + (g * VW + j) * VW, splat(0.f));
                UNROLL for (int g = 0; g < gn; g++) {
                    float *ph = part + (h0 + g) * stride;
                    vf sc = sums_of(prod + g * VW * VW) * splat(a->scale);
                    for (int64_t j = m; j < VW; j++) sc[j] = -INFINITY;
                    const float top = hmax(sc);
                    float r = 1.f;
                    if (top > ph[dim]) {
                        r = expf(ph[dim] - top);  /* 0 for the first chunk (max -inf) */
                        ph[dim] = top;
                    }
                    const vf p = exp_nonpositive_bits(sc - splat(ph[dim]));
                    ph[dim + 1] = ph[dim + 1] * r + hsum(p);
                    st(w + g * VW, p);
                    UNROLL for (int i = 0; i < nv; i++) acc[g][i] = ld(ph + i * VW) * splat(r);
                }
                for (int64_t j = 0; j < m; j++) {
                    const float *v = a->v_base + off[c + j] + kh * a->head_stride;
                    if (g0 == 0 && next + j < n)
                        prefetch(a->v_base + off[next + j] + kh * a->head_stride, dim);
                    vf vv[16];
                    UNROLL for (int i = 0; i < nv; i++) vv[i] = ld(v + i * VW);
                    UNROLL for (int g = 0; g < gn; g++) {
                        const vf wj = splat(w[g * VW + j]);
                        UNROLL for (int i = 0; i < nv; i++) acc[g][i] += wj * vv[i];
                    }
                }
                UNROLL for (int g = 0; g < gn; g++)
                    UNROLL for (int i = 0; i < nv; i++)
                        st(part + (h0 + g) * stride + i * VW, acc[g][i]);
            }
    }
}

/* Any other head size or group: in scalar loops and two passes, all the span's scores (and
   their exps) before any value. */
static void attend_span_any(const args_t *a, int64_t b, int64_t s, int64_t e, float *scores,
                            float *part, int64_t dim, int64_t group)
{
    const int64_t n = e - s, bs = a->block_size, heads = a->heads, stride = dim + 2;
    const int64_t *tab = a->table + b * a->max_blocks;
    const float *q = a->q + b * heads * dim;
    for (int64_t p = s; p < e; p++) {
        const float *row = a->k_base + tab[p / bs] * a->block_stride + (p % bs) * a->token_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float *k = row + (h / group) * a->head_stride;
            float acc = 0.f;
            for (int64_t d = 0; d < dim; d++) acc += q[h * dim + d] * k[d];
            scores[h * SPAN + (p - s)] = acc * a->scale;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *ph = part + h * stride;
        exp_scores(scores + h * SPAN, n, ph + dim, ph + dim + 1);
        memset(ph, 0, sizeof(float) * dim);
    }
    for (int64_t p = s; p < e; p++) {
        const float *row = a->v_base + tab[p / bs] * a->block_stride + (p % bs) * a->token_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float *v = row + (h / group) * a->head_stride;
            const float w = scores[h * SPAN + (p - s)];
            for (int64_t d = 0; d < dim; d++) part[h * stride + d] += w * v[d];
        }
    }
}

#define CASE(D, G) case (D) * 16 + (G): attend_span(a, b, s, e, part, D, G); return;

static void attend(const args_t *a, int64_t b, int64_t s, int64_t e, float *scores,
                   float *part, int64_t dim, int64_t group)
{
    if (group <= 8)
        switch (dim * 16 + group) {
            CASE(64, 1) CASE(64, 2) CASE(64, 3) CASE(64, 4)
            CASE(64, 5) CASE(64, 6) CASE(64, 7) CASE(64, 8)
            CASE(128, 1) CASE(128, 2) CASE(128, 3) CASE(128, 4)
            CASE(128, 5) CASE(128, 6) CASE(128, 7) CASE(128, 8)
        }
    attend_span_any(a, b, s, e, scores, part, dim, group);
}

/* The pool's work item: one span. */
typedef struct {
    const args_t *a;
    const int64_t *item_b, *item_s, *item_e;
    float *parts;
    int64_t dim, group;
} job_t;

static pantry_run_fn run = NULL;

void pantry_paged_decode_set_pool(pantry_run_fn fn) { run = fn; }

static void span_block(const void *ctx, int64_t it)
{
    /* Each thread's scores, kept from job to job: a helper's stack is small. */
    static __thread float *scores = NULL;
    static __thread int64_t capacity = 0;
    const job_t *j = ctx;
    const int64_t need = j->a->heads * SPAN;
    if (need > capacity) {
        free(scores);
        scores = (float *)malloc(sizeof(float) * need);
        capacity = need;
    }
    attend(j->a, j->item_b[it], j->item_s[it], j->item_e[it], scores,
           j->parts + it * j->a->heads * (j->dim + 2), j->dim, j->group);
}

void pantry_paged_decode(
    const float *restrict q, const float *restrict k_base, const float *restrict v_base,
    int64_t block_stride, int64_t token_stride, int64_t head_stride,
    const int64_t *table, int64_t max_blocks, const int64_t *lens,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
    float scale, int64_t window, float *restrict out)
{
    const int64_t group = heads / kv_heads, stride = dim + 2;
    const args_t a = {q, k_base, v_base, block_stride, token_stride, head_stride, table,
                      max_blocks, heads, kv_heads, block_size, scale};
    int64_t items = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b], start = (window > 0 && len > window) ? len - window : 0;
        items += (len - start + SPAN - 1) / SPAN;
    }
    int64_t *item_b = (int64_t *)malloc(sizeof(int64_t) * 3 * items);
    int64_t *item_s = item_b + items, *item_e = item_s + items;
    float *parts = (float *)malloc(sizeof(float) * items * heads * stride);
    int64_t i = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b], start = (window > 0 && len > window) ? len - window : 0;
        for (int64_t s = start; s < len; s += SPAN, i++) {
            item_b[i] = b;
            item_s[i] = s;
            item_e[i] = s + SPAN < len ? s + SPAN : len;
        }
    }
    const job_t job = {&a, item_b, item_s, item_e, parts, dim, group};
    if (run == NULL) {
        for (int64_t it = 0; it < items; it++) span_block(&job, it);
    } else {
        run(span_block, &job, items);
    }
    /* A sequence's spans merged by their max scores: the softmax over all its positions. */
    i = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t first = i;
        while (i < items && item_b[i] == b) i++;
        for (int64_t h = 0; h < heads; h++) {
            float m = -INFINITY, l = 0.f;
            for (int64_t j = first; j < i; j++) {
                const float mj = parts[(j * heads + h) * stride + dim];
                m = mj > m ? mj : m;
            }
            float *o = out + (b * heads + h) * dim;
            memset(o, 0, sizeof(float) * dim);
            for (int64_t j = first; j < i; j++) {
                const float *pj = parts + (j * heads + h) * stride;
                const float w = expf(pj[dim] - m);
                l += w * pj[dim + 1];
                for (int64_t d = 0; d < dim; d++) o[d] += w * pj[d];
            }
            const float inv = 1.f / l;
            for (int64_t d = 0; d < dim; d++) o[d] *= inv;
        }
    }
    free(parts);
    free(item_b);
}

int pantry_paged_decode_lanes(void) { return VW; }
"""


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library, built with the pool's flags and `extra_flags` (tests build the eight-wide
    form with -mno-avx512f)."""
    handle = ctypes.CDLL(str(compile_library("paged_decode", _SOURCE,
                                             [*cpu_pool.C_FLAGS, *extra_flags])))
    fn = handle.pantry_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64,
                   ctypes.c_float, i64, ptr]
    fn.restype = None
    handle.pantry_paged_decode_set_pool.argtypes = [ptr]
    handle.pantry_paged_decode_set_pool.restype = None
    handle.pantry_paged_decode_set_pool(cpu_pool.run_function())
    handle.pantry_paged_decode_lanes.argtypes = []
    handle.pantry_paged_decode_lanes.restype = ctypes.c_int
    return handle


_kernel = KernelLibrary("CPU paged attention kernel", "torch", _build)


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call) and not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


def lanes() -> int:
    """Positions the kernel takes at a time: 16 where it was built with AVX-512, else 8."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_paged_decode_lanes())


def paged_decode_attention_cpu(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    scale: float, sliding_window: int | None = None,
) -> Tensor:
    """q [B, H, hd] float32; k_cache/v_cache one layer's [num_blocks, block_size, n_kv, hd]
    views of the cache (strided over blocks); block_table [B, max_blocks] int64; seq_lens [B]
    int64 keys per sequence, the new token's included -> [B, H, hd]."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    b, heads, dim = q.shape
    num_blocks, block_size, kv_heads, hd = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and hd == dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert heads % kv_heads == 0
    q = q.contiguous()
    table = block_table.contiguous()
    lens = seq_lens.contiguous()
    assert table.dtype == lens.dtype == torch.int64 and table.shape[0] == b
    out = torch.empty_like(q)
    lib.pantry_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.data_ptr(), table.shape[1], lens.data_ptr(),
        b, heads, kv_heads, dim, block_size, scale, sliding_window or 0, out.data_ptr())
    return out
