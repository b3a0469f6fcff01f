"""Prefill attention on CPU: every prefill sequence of a step in one C call, read in place from
the paged KV cache (causal, grouped heads, cached prefix, sliding window).

The torch path (`engine.attention`) runs torch's CPU flash attention once per lone sequence
(twice, merged by log-sum-exp, after a cached prefix) or a masked SDPA over keys gathered out of
the cache for several sequences; it reaches ~64 GFLOP/s on two Zen 4 cores. Here a work item is
(sequence, KV head, tile of query tokens): the query heads sharing the KV head go through
together, so each key and value is read once for all of them. Within an item the queries lie
across the vector lanes (`VW` tokens a vector, one vector per head and token group) and both
products are broadcasts of the cache's own rows:
- scores S[key][q] = sum_d Qt[d][q] * K[key][d]: a K element broadcast, a vector of queries
  loaded, one FMA; no transposed copy of K and no horizontal sum;
- an online (flash) softmax over blocks of KB keys: the row maximum, the exps and their sum are
  vertical operations over the lanes, the exp a vectorized Cephes polynomial within ~1 ulp;
- output Ot[d][q] += P[key][q] * V[key][d]: again a broadcast V element times a vector.
The item's queries are transposed in once and its outputs out once. Items are claimed through
the engine's thread pool (engine.cpu_pool), most keys first; each output row is computed by one
item in a fixed order, so results do not depend on the number of threads.

Measured (bench/prefill_attention.py, SmolLM2's 9 heads / 3 KV heads / head size 64, two
threads, OMP_WAIT_POLICY=PASSIVE, alternated with torch in one run; the 2-core Zen 4 shared
with other work, so indicative), one layer's call, median: causal 512 tokens 5.3 -> 2.4 ms
(torch's SDPA with is_causal and enable_gqa), 1024: 13.2 -> 7.6, 2048: 42.4 -> 27.4 (~170
GFLOP/s, ~75% of the cores' FMA peak); 512 after 1536 cached (`_lone_prefill`, two calls merged
by log-sum-exp) 18.5 -> 12.4; three sequences 512/300/200 (the masked SDPA over gathered keys)
18.8 -> 3.8. A cold SmolLM2 prefill step, 512 tokens: 738-777 -> 647-658 ms; 2048 tokens:
3533 -> 3019 ms. On one thread at 2048 tokens the two products each run at ~95% of the FMA
peak; the softmax (5% the exps) and the transposes take the other ~13%. On an Intel Xeon
(the GPU machine, 2 pinned threads) the calls are 1.8 / 1.55 / 1.3x torch's at 512 / 1024 /
2048 tokens.

Shapes: any head size that is a multiple of 8, any number of query heads per KV head. The C
is built on first use (pantry.common.c_library) with the machine's vectors (16 lanes with AVX-512,
else 8: AVX2 or the compiler's scalar lowering). `available()` is False where no compiler
works, with PANTRY_CPU_KERNELS=0 or PANTRY_CPU_PREFILL_ATTENTION=0; callers keep torch.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from engine import cpu_pool
from engine.c_exp import C_EXP
from pantry.common.c_library import KernelLibrary, compile_library

_SOURCE = r"""
#include <math.h>
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
""" + cpu_pool.C_POOL_TYPES + r"""
/* VW query lanes a vector. Per step of the products, NG query vectors times J keys (scores)
   or D dims (outputs) accumulators, the NG vectors and a broadcast fit the registers: 32 with
   AVX-512, 16 with AVX2 (and whatever the scalar lowering has). */
#if defined(__AVX512F__)
#define VW 16
#define J 8
#else
#define VW 8
#define J 4
#endif
#define D J
#define NG 3
/* Keys a softmax step: the scores of an item's queries for them stay in L1. */
#define KB 32
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf ld(const float *p) { return *(const vf *)p; }  /* scratch: aligned */
INLINE void st(float *p, vf v) { *(vf *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }
""" + C_EXP + r"""
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }

/* e^x for x <= 0 (a score minus its running maximum; -inf for a masked one: 0), within
   ~1 ulp: x = n ln2 + r, times 2^n by vscalefps, which gives the denormals and 0 below them
   as expf does. */
INLINE vf exp_nonpositive(vf x)
{
    x = vmax(x, splat(-110.f));
    const vf n = (vf)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf p = exp_reduced(x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f));
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
}
#else
INLINE vf vmax(vf a, vf b) { const vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }

INLINE vf exp_nonpositive(vf x) { return exp_nonpositive_bits(x); }
#endif

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, block_stride, token_stride, head_stride;
    const int64_t *table, *seqs;      /* seqs [nseq, 3]: first query row, queries, context */
    int64_t max_blocks, heads, kv_heads, dim, block_size, window, tile_vecs;
    float scale;
    float *out;
    int64_t o_row, o_head;
    const int64_t *items;             /* [n, 3]: sequence, KV head, first query */
} args_t;

""" + cpu_pool.C_THREAD_SCRATCH + r"""
/* Scores of `ng` query vectors (qt [ng][dim][VW]) for nk keys (rows kp, nk a multiple of J)
   -> s [ng][KB][VW]. */
INLINE void scores(const float *qt, const float *const *kp, float *s, int64_t dim, int nk,
                   const int ng)
{
    for (int j0 = 0; j0 < nk; j0 += J) {
        vf acc[NG][J];
        for (int g = 0; g < ng; g++)
            for (int j = 0; j < J; j++) acc[g][j] = splat(0.f);
        for (int64_t d = 0; d < dim; d++) {
            vf qv[NG];
            for (int g = 0; g < ng; g++) qv[g] = ld(qt + (g * dim + d) * VW);
            for (int j = 0; j < J; j++) {
                const vf kb = splat(kp[j0 + j][d]);
                for (int g = 0; g < ng; g++) acc[g][j] += qv[g] * kb;
            }
        }
        for (int g = 0; g < ng; g++)
            for (int j = 0; j < J; j++) st(s + (g * KB + j0 + j) * VW, acc[g][j]);
    }
}

/* ot [ng][dim][VW] = ot * corr + sum over the nk keys of p [ng][KB][VW] times their values. */
INLINE void values(float *ot, const float *p, const float *corr, const float *const *vp,
                   int64_t dim, int nk, const int ng)
{
    for (int64_t d0 = 0; d0 < dim; d0 += D) {
        vf acc[NG][D];
        for (int g = 0; g < ng; g++) {
            const vf c = ld(corr + g * VW);
            for (int e = 0; e < D; e++) acc[g][e] = ld(ot + (g * dim + d0 + e) * VW) * c;
        }
        for (int j = 0; j < nk; j++) {
            vf pv[NG];
            for (int g = 0; g < ng; g++) pv[g] = ld(p + (g * KB + j) * VW);
            const float *row = vp[j] + d0;
            for (int e = 0; e < D; e++) {
                const vf vb = splat(row[e]);
                for (int g = 0; g < ng; g++) acc[g][e] += pv[g] * vb;
            }
        }
        for (int g = 0; g < ng; g++)
            for (int e = 0; e < D; e++) st(ot + (g * dim + d0 + e) * VW, acc[g][e]);
    }
}

static void item(const void *ctx, int64_t it)
{
    const args_t *a = ctx;
    const int64_t seq = a->items[it * 3], kh = a->items[it * 3 + 1], t0 = a->items[it * 3 + 2];
    const int64_t first = a->seqs[seq * 3], qlen = a->seqs[seq * 3 + 1];
    const int64_t context = a->seqs[seq * 3 + 2];
    const int64_t dim = a->dim, group = a->heads / a->kv_heads, tv = a->tile_vecs;
    const int64_t nq = group * tv, tokens = tv * VW;
    const int64_t valid = qlen - t0 < tokens ? qlen - t0 : tokens;
    const int64_t min_pos = context + t0, max_pos = context + t0 + valid - 1;
    const int64_t lo = a->window > 0 && min_pos - a->window + 1 > 0 ? min_pos - a->window + 1 : 0;
    const int64_t hi = max_pos + 1;
    /* Query vector n = g * tv + c: head kh * group + g, tokens t0 + c * VW + lane. */
    float *qt = scratch_for(2 * nq * dim * VW + nq * KB * VW + 3 * nq * VW + tv * VW);
    if (!qt) abort();  /* tens of KB a thread: without them nothing can run */
    float *ot = qt + nq * dim * VW, *s = ot + nq * dim * VW, *m = s + nq * KB * VW;
    float *l = m + nq * VW, *corr = l + nq * VW;
    int32_t *pos = (int32_t *)(corr + nq * VW);
    for (int64_t c = 0; c < tv; c++)
        for (int64_t i = 0; i < VW; i++) {
            const int64_t t = c * VW + i;
            pos[c * VW + i] = (int32_t)(context + t0 + (t < valid ? t : valid - 1));
        }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < tv; c++) {
            float *dst = qt + (g * tv + c) * dim * VW;
            for (int64_t i = 0; i < VW; i++) {
                const int64_t t = c * VW + i;
                if (t >= valid) {
                    for (int64_t d = 0; d < dim; d++) dst[d * VW + i] = 0.f;
                    continue;
                }
                const float *src = a->q + (first + t0 + t) * a->q_row
                                   + (kh * group + g) * a->q_head;
                for (int64_t d = 0; d < dim; d++) dst[d * VW + i] = src[d] * a->scale;
            }
        }
    memset(ot, 0, sizeof(float) * nq * dim * VW);
    for (int64_t n = 0; n < nq; n++) {
        st(m + n * VW, splat(-FLT_MAX));  /* finite: a lane masked so far gets exps of 0 */
        st(l + n * VW, splat(0.f));
    }
    const int64_t *tab = a->table + seq * a->max_blocks, bs = a->block_size;
    const float *kp[KB], *vp[KB];
    for (int64_t k0 = lo; k0 < hi; k0 += KB) {
        /* The block's keys, to a whole number of J; those past the range repeat its last one
           (their scores are masked). */
        const int nk = hi - k0 >= KB ? KB : (int)((hi - k0 + J - 1) / J * J);
        for (int64_t j = 0, b = k0 / bs, o = k0 % bs; j < nk; j++) {
            if (k0 + j < hi) {
                const int64_t off = tab[b] * a->block_stride + o * a->token_stride
                                    + kh * a->head_stride;
                kp[j] = a->k + off;
                vp[j] = a->v + off;
                if (++o == bs) { o = 0; b++; }
            } else {
                kp[j] = kp[j - 1];
                vp[j] = vp[j - 1];
            }
        }
        int64_t n = 0;
        for (; n + NG <= nq; n += NG)
            scores(qt + n * dim * VW, kp, s + n * KB * VW, dim, nk, NG);
        if (nq - n == 2) scores(qt + n * dim * VW, kp, s + n * KB * VW, dim, nk, 2);
        if (nq - n == 1) scores(qt + n * dim * VW, kp, s + n * KB * VW, dim, nk, 1);
        /* Only blocks reaching past the first query, or before the last one's window, mask. */
        const int masked = k0 + nk - 1 > min_pos || (a->window > 0 && k0 <= max_pos - a->window);
        for (int64_t c = 0; c < tv && masked; c++) {
            const vi pv = *(const vi *)(pos + c * VW);
            for (int j = 0; j < nk; j++) {
                const vi kpos = (vi){0} + (int32_t)(k0 + j);
                vi keep = kpos <= pv;
                if (a->window > 0) keep &= kpos > pv - (int32_t)a->window;
                for (int64_t g = 0; g < group; g++) {
                    float *sv = s + ((g * tv + c) * KB + j) * VW;
                    st(sv, (vf)(((vi)ld(sv) & keep) | ((vi)splat(-INFINITY) & ~keep)));
                }
            }
        }
        for (int64_t q = 0; q < nq; q++) {
            float *sq = s + q * KB * VW;
            vf mx = ld(m + q * VW);
            for (int j = 0; j < nk; j++) mx = vmax(mx, ld(sq + j * VW));
            vf sum = splat(0.f);
            for (int j = 0; j < nk; j++) {
                const vf e = exp_nonpositive(ld(sq + j * VW) - mx);
                st(sq + j * VW, e);
                sum += e;
            }
            const vf c = exp_nonpositive(ld(m + q * VW) - mx);
            st(corr + q * VW, c);
            st(l + q * VW, ld(l + q * VW) * c + sum);
            st(m + q * VW, mx);
        }
        n = 0;
        for (; n + NG <= nq; n += NG)
            values(ot + n * dim * VW, s + n * KB * VW, corr + n * VW, vp, dim, nk, NG);
        if (nq - n == 2)
            values(ot + n * dim * VW, s + n * KB * VW, corr + n * VW, vp, dim, nk, 2);
        if (nq - n == 1)
            values(ot + n * dim * VW, s + n * KB * VW, corr + n * VW, vp, dim, nk, 1);
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < tv; c++) {
            const int64_t n = g * tv + c;
            const float *src = ot + n * dim * VW;
            const vf inv = splat(1.f) / ld(l + n * VW);
            for (int64_t i = 0; i < VW && c * VW + i < valid; i++) {
                float *dst = a->out + (first + t0 + c * VW + i) * a->o_row
                             + (kh * group + g) * a->o_head;
                for (int64_t d = 0; d < dim; d++) dst[d] = src[d * VW + i] * inv[i];
            }
        }
}

static pantry_run_fn run_blocks = 0;

void pantry_prefill_set_pool(pantry_run_fn run) { run_blocks = run; }

static int heavier_first(const void *x, const void *y)
{
    const int64_t *a = x, *b = y;
    if (a[3] != b[3]) return a[3] > b[3] ? -1 : 1;
    return a[4] < b[4] ? -1 : a[4] > b[4];
}

/* Tokens of an item: one vector of them where the group alone fills the NG-vector steps,
   else NG vectors. */
static int64_t tile_tokens(int64_t group) { return (group % NG == 0 ? 1 : NG) * VW; }

/* Returns 0, or -1 where memory for the work list ran out (nothing written then). */
int pantry_prefill_attention(
    const float *q, int64_t q_row, int64_t q_head, const float *k, const float *v,
    int64_t block_stride, int64_t token_stride, int64_t head_stride,
    const int64_t *table, int64_t max_blocks, const int64_t *seqs, int64_t nseq,
    int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
    int64_t window, float *out, int64_t o_row, int64_t o_head)
{
    const int64_t group = heads / kv_heads, tokens = tile_tokens(group);
    int64_t n = 0;
    for (int64_t s = 0; s < nseq; s++) n += kv_heads * ((seqs[s * 3 + 1] + tokens - 1) / tokens);
    /* Sorted as [seq, kv head, first query, cost, index], then packed to the first three. */
    int64_t *work = malloc(sizeof(int64_t) * 5 * (n ? n : 1));
    if (!work) return -1;
    int64_t i = 0;
    for (int64_t s = 0; s < nseq; s++) {
        const int64_t qlen = seqs[s * 3 + 1], context = seqs[s * 3 + 2];
        for (int64_t t0 = 0; t0 < qlen; t0 += tokens) {
            const int64_t last = context + (t0 + tokens < qlen ? t0 + tokens : qlen);
            const int64_t from = window > 0 && context + t0 - window + 1 > 0
                                 ? context + t0 - window + 1 : 0;
            for (int64_t kh = 0; kh < kv_heads; kh++, i++) {
                int64_t *w = work + i * 5;
                w[0] = s; w[1] = kh; w[2] = t0; w[3] = last - from; w[4] = i;
            }
        }
    }
    qsort(work, (size_t)n, sizeof(int64_t) * 5, heavier_first);
    for (i = 0; i < n; i++) memmove(work + i * 3, work + i * 5, sizeof(int64_t) * 3);
    const args_t a = {q, k, v, q_row, q_head, block_stride, token_stride, head_stride, table,
                      seqs, max_blocks, heads, kv_heads, dim, block_size, window,
                      tokens / VW, scale, out, o_row, o_head, work};
    if (run_blocks) run_blocks(item, &a, n);
    else for (i = 0; i < n; i++) item(&a, i);
    free(work);
    return 0;
}
"""


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library; `extra_flags` build another (the tests' narrower vectors: -mno-avx512f)."""
    handle = ctypes.CDLL(str(compile_library("prefill_attention", _SOURCE,
                                             [*cpu_pool.C_FLAGS, *extra_flags])))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = handle.pantry_prefill_attention
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64,
                   i64, ctypes.c_float, i64, ptr, i64, i64]
    fn.restype = ctypes.c_int
    handle.pantry_prefill_set_pool.argtypes = [ptr]
    handle.pantry_prefill_set_pool.restype = None
    # None (no pool): every item on the caller, in order.
    handle.pantry_prefill_set_pool(cpu_pool.run_function())
    return handle


_kernel = KernelLibrary("CPU prefill attention kernel", "torch SDPA", _build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_PREFILL_ATTENTION"))


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call) and not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


def supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether `prefill_attention` takes these: float32 on CPU, head size a multiple of 8,
    rows of each head contiguous, K and V laid out alike; and the kernel is available."""
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and q.shape[-1] % 8 == 0 and q.shape[-1] == k_cache.shape[-1]
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1
            and k_cache.stride() == v_cache.stride() and q.shape[1] % k_cache.shape[-2] == 0
            and available())


def prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, sequences: Tensor, block_table: Tensor,
    scale: float, sliding_window: int | None, out: Tensor,
) -> None:
    """Attention of every sequence with more than one query into `out`'s rows of it.

    q [T, H, hd] float32 (rows and heads strided, each head's hd floats contiguous);
    sequences [P, 3] int64 (engine.attention_batch.PrefillGroup.sequences): sequence i owns rows
    first .. first + queries - 1, at positions context onwards, its keys and values already
    written to k_cache/v_cache (one layer's [num_blocks, block_size, n_kv, hd] views of the
    cache); block_table [P * max_blocks] or [P, max_blocks] int64, the table row of each
    sequence in order. Query j of a sequence sees keys 0 .. context + j, and only those after
    context + j - sliding_window. Other rows of `out` are left untouched."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert supports(q, k_cache, v_cache)
    assert sequences.dtype == torch.int64 and sequences.is_contiguous()
    _attend(lib, q, k_cache, v_cache, sequences, block_table, scale, sliding_window, out)


def _attend(lib: ctypes.CDLL, q: Tensor, k_cache: Tensor, v_cache: Tensor, seqs: Tensor,
            block_table: Tensor, scale: float, sliding_window: int | None, out: Tensor) -> None:
    assert out.shape == q.shape and out.dtype == torch.float32 and out.stride(-1) == 1
    num_seqs = seqs.shape[0]
    if not num_seqs:
        return
    table = block_table.reshape(num_seqs, -1)
    assert table.dtype == torch.int64 and table.is_contiguous()
    num_blocks, block_size, kv_heads, hd = k_cache.shape
    heads = q.shape[1]
    rc = lib.pantry_prefill_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.data_ptr(),
        table.shape[1], seqs.data_ptr(), num_seqs, heads, kv_heads, hd, block_size, scale,
        sliding_window or 0, out.data_ptr(), out.stride(0), out.stride(1))
    if rc:
        raise MemoryError("prefill attention: no memory for the work list")
