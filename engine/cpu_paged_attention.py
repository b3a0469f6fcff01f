"""Paged decode attention on CPU, read in place from the paged KV cache.

The torch path (`engine.attention._decode`) gathers every decoding sequence's keys and values
out of the cache into new tensors for each layer, then calls SDPA: the gather copies the whole
context each layer of each step (a 4k-token sequence: ~180 MB a step for SmolLM2), so a step
slows down with every long sequence in the batch. This kernel reads each block where it lies,
in cache order, every KV head of a token's row at once, on our own thread pool (engine.cpu_pool,
as the step's linears); a long sequence is split into spans, the pool's blocks, and merged
(flash-decoding), and the exps are
computed eight at a time. Head sizes 64 and 128 with up to 8 query heads per KV head get loops
unrolled at compile time; any other shape runs the same steps in scalar loops. The same role as
the Triton kernel plays on CUDA.

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

# Per span of up to SPAN positions of a sequence: scores of every query head (each token's row
# of every KV head read once, in cache order), their exps, then the weighted sum of values;
# a sequence's spans merged by their max scores. Spans are the threads' work items.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
""" + cpu_pool.C_POOL_TYPES + r"""
/* Eight floats (GCC/Clang vector extensions: one AVX register where the CPU has it), loaded
   from and stored to any float address. */
typedef float vf __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4)));
typedef int32_t vi __attribute__((vector_size(32)));
#define VW 8
#define INLINE static inline __attribute__((always_inline))

INLINE vf ld(const float *p) { return *(const vfu *)p; }
INLINE void st(float *p, vf v) { *(vfu *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }
INLINE float hsum(vf v)
{
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
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

/* The next block lies anywhere in the cache: a token's row of it is asked for one block
   ahead of its use, spread over the block's tokens (all at once stalls on the fill
   buffers). */
INLINE void prefetch(const float *p, int64_t floats)
{
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i);
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

/* Block blk of a span [s, e) in `base` (K or V): its rows, the next block's (NULL at the span's
   end, else prefetched a token ahead) and the tokens [t0, t1) of it inside the span. */
typedef struct {
    const float *rows, *next;
    int64_t t0, t1;
} block_t;

INLINE block_t block_at(const args_t *a, const float *base, const int64_t *tab, int64_t blk,
                        int64_t s, int64_t e)
{
    const int64_t bs = a->block_size;
    const block_t out = {
        base + tab[blk] * a->block_stride,
        (blk + 1) * bs < e ? base + tab[blk + 1] * a->block_stride : 0,
        blk * bs < s ? s - blk * bs : 0,
        (blk + 1) * bs > e ? e - blk * bs : bs,
    };
    return out;
}

/* Positions [s, e) of sequence b for every query head, reading each token's row of every KV
   head once, in cache order. `part` gets per query head the unnormalised sum of values (dim
   floats), then the max score and the sum of the exps. Inlined with constant dim and group:
   loops unroll and a KV head's row is held in registers. */
INLINE void attend_span(const args_t *a, int64_t b, int64_t s, int64_t e, float *scores,
                        float *part, const int dim, const int group)
{
    const int nv = dim / VW;
    const int64_t n = e - s, bs = a->block_size, kvh = a->kv_heads, heads = a->heads;
    const int64_t row = kvh * a->head_stride, stride = dim + 2;
    const int64_t *tab = a->table + b * a->max_blocks;
    const float *q = a->q + b * heads * dim;
    for (int64_t blk = s / bs; blk * bs < e; blk++) {
        const block_t at = block_at(a, a->k_base, tab, blk, s, e);
        for (int64_t t = at.t0; t < at.t1; t++) {
            const int64_t p = blk * bs + t - s;
            if (at.next) prefetch(at.next + t * a->token_stride, row);
            for (int64_t kh = 0; kh < kvh; kh++) {
                const float *k = at.rows + t * a->token_stride + kh * a->head_stride;
                vf kv[16];
                for (int i = 0; i < nv; i++) kv[i] = ld(k + i * VW);
                for (int g = 0; g < group; g++) {
                    const float *qh = q + (kh * group + g) * dim;
                    vf s0 = ld(qh) * kv[0], s1 = splat(0.f);
                    for (int i = 1; i < nv; i += 2) {
                        s1 += ld(qh + i * VW) * kv[i];
                        if (i + 1 < nv) s0 += ld(qh + (i + 1) * VW) * kv[i + 1];
                    }
                    scores[(kh * group + g) * SPAN + p] = hsum(s0 + s1) * a->scale;
                }
            }
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *ph = part + h * stride;
        exp_scores(scores + h * SPAN, n, ph + dim, ph + dim + 1);
        memset(ph, 0, sizeof(float) * dim);
    }
    /* The sums stay in L1 (heads * dim floats) while the values stream past in cache order:
       holding them in registers instead means several passes over each block. */
    for (int64_t blk = s / bs; blk * bs < e; blk++) {
        const block_t at = block_at(a, a->v_base, tab, blk, s, e);
        for (int64_t t = at.t0; t < at.t1; t++) {
            const int64_t p = blk * bs + t - s;
            if (at.next) prefetch(at.next + t * a->token_stride, row);
            for (int64_t kh = 0; kh < kvh; kh++) {
                const float *v = at.rows + t * a->token_stride + kh * a->head_stride;
                vf vv[16];
                for (int i = 0; i < nv; i++) vv[i] = ld(v + i * VW);
                for (int g = 0; g < group; g++) {
                    float *o = part + (kh * group + g) * stride;
                    const vf w = splat(scores[(kh * group + g) * SPAN + p]);
                    for (int i = 0; i < nv; i++) st(o + i * VW, ld(o + i * VW) + w * vv[i]);
                }
            }
        }
    }
}

/* Any other head size or group: the same, in scalar loops. */
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

#define CASE(D, G) case (D) * 16 + (G): attend_span(a, b, s, e, scores, part, D, G); return;

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
"""


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("paged_decode", _SOURCE, cpu_pool.C_FLAGS)))
    fn = handle.pantry_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64,
                   ctypes.c_float, i64, ptr]
    fn.restype = None
    handle.pantry_paged_decode_set_pool.argtypes = [ptr]
    handle.pantry_paged_decode_set_pool.restype = None
    handle.pantry_paged_decode_set_pool(cpu_pool.run_function())
    return handle


_kernel = KernelLibrary("CPU paged attention kernel", "torch", _build)


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call) and not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


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
