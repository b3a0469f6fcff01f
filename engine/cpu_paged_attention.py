"""Paged decode attention on CPU, read in place from the paged KV cache.

The torch path (`engine.attention._decode`) gathers every decoding sequence's keys and values
out of the cache into new tensors for each layer, then calls SDPA: the gather copies the whole
context each layer of each step (a 4k-token sequence: ~180 MB a step for SmolLM2), so a step
slows down with every long sequence in the batch. This kernel reads each block where it lies,
on our own thread pool (engine.cpu_pool, as the step's linears): a long sequence is split into
spans, the pool's blocks, merged at the end (flash-decoding); within a span it goes 32
positions at a time with flash attention's online softmax, so a chunk's K and V rows are read
from memory once, while the next chunk's rows are asked for in the order they lie. Head sizes
64 and 128 with up to 8 query heads per KV head get loops unrolled at compile time, a query
head's q row or sums in registers; any other shape runs the two-pass form in scalar loops.
The same role as the Triton kernel plays on CUDA.

It is C compiled on first use with the machine's C compiler (pantry.common.c_library) and loaded
with ctypes. Where no compiler works, `available()` is False and the engine keeps the torch
path; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from engine import cpu_pool
from engine.c_exp import C_EXP
from pantry.common.c_library import KernelLibrary, compile_library

# Per span of up to SPAN positions of a sequence, per query head: the weighted sum of values,
# the max score and the sum of the exps; a sequence's spans merged by their max scores. Spans
# are the threads' work items.
_SOURCE = r"""
#include <math.h>
#include <pthread.h>
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

/* Positions per work item: a long sequence is split over threads, its spans merged after. */
#define SPAN 512

/* Positions in a call worth waking the pool's far helpers for (engine.cpu_pool): a thread on
   the other engine's CPU takes spans while the caller takes the rest. */
#define FAR_POSITIONS 2048

/* Positions per chunk. A chunk's scores are all computed before its softmax step, so the max,
   the rescale and the exps are paid once per CH positions per query head, not per VW; small
   enough that a KV head's rows of a chunk (SmolLM2: 8 KB of K, 8 KB of V) stay in L1 while
   its group's query heads read them in turn. One thread over a 4k-token sequence, 30 layers,
   blocks scattered (a Zen 3, alternated in one process): 16-19 ms at 16 and at 32, within
   noise of each other, 18-19 at 64, 19-20 at 128. 32 rather than 16 keeps the softmax step
   for two of AVX-512's sixteen-position groups. */
#define CH 32

typedef struct {
    const float *q, *k_base, *v_base;
    int64_t block_stride, token_stride, head_stride;
    const int64_t *table;
    int64_t max_blocks, heads, kv_heads, block_size;
    float scale;
} args_t;

/* The next chunk's K and V rows, every KV head's (a position's whole row), asked for a few
   64-byte lines at a time through the current chunk's work, so that all are asked for before
   the chunk ends: a position's K lines in order, then its V lines. A row is contiguous and a
   block's rows follow each other, so the requests walk each block's part of the layer straight
   through. One thread over a 4k-token sequence, 30 layers, blocks scattered (a Zen 3,
   alternated in one process): 16-19 ms, against 23-25 ms asking for each head's rows of the
   next chunk during that head's pass, 25 asking for none, and 12 ms for a loop that only reads
   the same rows in the same order. */
typedef struct {
    const float *k, *v;
    const int64_t *off;
    int64_t p, end, lines, l, per_call;
} ahead_t;

INLINE void read_ahead(ahead_t *c)
{
    for (int64_t i = 0; i < c->per_call && c->p < c->end; i++) {
        const int64_t o = c->off[c->p] + c->l * 16;
        __builtin_prefetch(c->l < c->lines ? c->k + o : c->v + o - c->lines * 16, 0, 1);
        if (++c->l == 2 * c->lines) { c->l = 0; c->p++; }
    }
}

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

INLINE vf vmax(vf x, vf y)
{
    const vi m = x > y;
    return (vf)(((vi)x & m) | ((vi)y & ~m));
}

/* Positions [s, e) of sequence b for every query head, a chunk of CH positions at a time
   (flash attention's online softmax from chunk to chunk): for each KV head, each of its query
   heads' scores over the chunk (the products of VW positions summed at once by sums_of), then
   per query head the chunk's max folded into its running max (rescaling its sums when it
   rises), the exps, and the values weighted into sums held in registers. `part` gets per query
   head the unnormalised sum of values (dim floats), then the max score and the sum of the
   exps. Inlined with constant dim and group: the loops over a row unroll and its q row or its
   sums stay in registers. */
INLINE void attend_span(const args_t *a, int64_t b, int64_t s, int64_t e, float *part,
                        const int dim, const int group)
{
    const int nv = dim / VW;
    const int64_t n = e - s, bs = a->block_size, kvh = a->kv_heads, heads = a->heads;
    const int64_t stride = dim + 2, hs = a->head_stride;
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
    /* A row's cache lines, and how many to ask for per row read so that the next chunk's are
       all asked for within this chunk (each row is read twice per query head: K and V). */
    const int64_t lines = (kvh * hs + 15) / 16;
    const int64_t per_call = (2 * lines + 2 * heads - 1) / (2 * heads);
    /* The first chunk's rows all at once: no work comes before them to spread them over. */
    ahead_t first = {a->k_base, a->v_base, off, 0, n < CH ? n : CH, lines, 0, 2 * lines};
    while (first.p < first.end) read_ahead(&first);
    float prod[VW * VW] __attribute__((aligned(64)));
    float sc[8 * CH] __attribute__((aligned(64)));
    for (int64_t c = 0; c < n; c += CH) {
        const int64_t m = n - c < CH ? n - c : CH;
        ahead_t ahead = {a->k_base, a->v_base, off, c + CH, c + 2 * CH < n ? c + 2 * CH : n,
                         lines, 0, per_call};
        for (int64_t kh = 0; kh < kvh; kh++) {
            const float *kb = a->k_base + kh * hs, *vb = a->v_base + kh * hs;
            for (int g = 0; g < group; g++) {
                vf qv[16];
                UNROLL for (int i = 0; i < nv; i++) qv[i] = ld(q + (kh * group + g) * dim + i * VW);
                for (int64_t j0 = 0; j0 < m; j0 += VW) {
                    const int64_t jn = m - j0 < VW ? m - j0 : VW;
                    for (int64_t j = 0; j < jn; j++) {
                        read_ahead(&ahead);
                        const float *k = kb + off[c + j0 + j];
                        vf s0 = qv[0] * ld(k), s1 = splat(0.f);
                        UNROLL for (int i = 1; i < nv; i += 2) {
                            s1 += qv[i] * ld(k + i * VW);
                            if (i + 1 < nv) s0 += qv[i + 1] * ld(k + (i + 1) * VW);
                        }
                        st(prod + j * VW, s0 + s1);
                    }
                    /* A short last chunk: its missing positions summed as zeros, then masked
                       (their exps are 0). */
                    for (int64_t j = jn; j < VW; j++) st(prod + j * VW, splat(0.f));
                    vf sv = sums_of(prod) * splat(a->scale);
                    for (int64_t j = jn; j < VW; j++) sv[j] = -INFINITY;
                    st(sc + g * CH + j0, sv);
                }
            }
            for (int g = 0; g < group; g++) {
                float *ph = part + (kh * group + g) * stride, *sg = sc + g * CH;
                vf top = ld(sg);
                for (int64_t j0 = VW; j0 < m; j0 += VW) top = vmax(top, ld(sg + j0));
                const float mx = hmax(top);
                float r = 1.f;
                if (mx > ph[dim]) {
                    r = expf(ph[dim] - mx);  /* 0 for the first chunk (max -inf) */
                    ph[dim] = mx;
                }
                const vf base = splat(ph[dim]);
                vf sum = splat(0.f);
                for (int64_t j0 = 0; j0 < m; j0 += VW) {
                    const vf p = exp_nonpositive_bits(ld(sg + j0) - base);
                    st(sg + j0, p);
                    sum += p;
                }
                ph[dim + 1] = ph[dim + 1] * r + hsum(sum);
                vf acc[16];
                UNROLL for (int i = 0; i < nv; i++) acc[i] = ld(ph + i * VW) * splat(r);
                for (int64_t j = 0; j < m; j++) {
                    read_ahead(&ahead);
                    const float *v = vb + off[c + j];
                    const vf wj = splat(sg[j]);
                    UNROLL for (int i = 0; i < nv; i++) acc[i] += wj * ld(v + i * VW);
                }
                UNROLL for (int i = 0; i < nv; i++) st(ph + i * VW, acc[i]);
            }
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

static pantry_run_fn run = NULL, run_far = NULL;

void pantry_paged_decode_set_pool(pantry_run_fn fn, pantry_run_fn far)
{
    run = fn;
    run_far = far;
}

/* Each thread's scores live in its scratch (a helper's stack is small). */
""" + cpu_pool.C_THREAD_SCRATCH + r"""

static void span_block(const void *ctx, int64_t it)
{
    const job_t *j = ctx;
    attend(j->a, j->item_b[it], j->item_s[it], j->item_e[it], scratch_for(j->a->heads * SPAN),
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
    int64_t items = 0, positions = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b], start = (window > 0 && len > window) ? len - window : 0;
        items += (len - start + SPAN - 1) / SPAN;
        positions += len - start;
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
    pantry_run_blocks(positions >= FAR_POSITIONS && run_far ? run_far : run, span_block, &job,
                      items);
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
    handle.pantry_paged_decode_set_pool.argtypes = [ptr, ptr]
    handle.pantry_paged_decode_set_pool.restype = None
    handle.pantry_paged_decode_set_pool(cpu_pool.run_function(),
                                        cpu_pool.run_function(far=True))
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
