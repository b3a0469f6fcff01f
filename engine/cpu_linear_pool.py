"""Few-row float32 linears (a decode step's matmuls) on CPU, on our own thread pool.

A decode step on CPU is ~121 small matmuls, each only ~50-300 us of weight streaming; with the
engines' passive OpenMP waits, oneDNN's second thread is woken by a futex for each of them
(engine.cpu_pool says why that costs). Here y = x @ W^T (+ bias) runs on engine.cpu_pool:
- a job is split into blocks of BW output features, one pool block each;
- the weight is stored blocked ([blocks, in, BW], `pack`): a block's BW output features are
  vectors of accumulators, each input element broadcast, each weight vector used for up to six
  input rows while loaded, so the weight streams once per call for any number of rows and
  there is no horizontal sum.
Each output element is one thread's sum in a fixed order, so results do not depend on the
number of threads or on who claimed what.

Measured per matmul and per decode step: engine/packed_linear.py's docstring. While prefill
computes beside decode (bench/interference.py --quick --setups disaggregated, 2 streams, this
kernel on -> off, PANTRY_CPU_LINEAR_POOL): TBT p50 32-33 vs 62 ms, p99 47-54 vs 80 ms, the
streams' tok/s 56-58 vs 32, the prompts' TTFT p50 12.9-13.2 vs 12.5 s. The decode attention
kernel stays on torch's OpenMP threads: run on the pool instead, its time at 8 streams of 1024
positions fell ~9% (23-26 vs 25-27 ms a step), inside a whole step's noise here.

`available()` is False where no compiler works, without the pool, with PANTRY_CPU_KERNELS=0
(every C kernel off) or PANTRY_CPU_LINEAR_POOL=0 (this one off): callers then keep oneDNN.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from engine import cpu_pool
from pantry.common.c_library import KernelLibrary, compile_library

# At most this many rows take the pool (decode batches); larger inputs (prefill chunks) stay on
# oneDNN. Measured (module docstring of engine/packed_linear.py): the pool is faster up to 32
# rows and about even from 64.
MAX_ROWS = 32

# The float32 register tile, shared with engine.cpu_quant_linear (which computes the same sums
# from weights it rebuilds). A block of output features is NV vectors of VW floats; with MR
# input rows at a time, the accumulators (MR * NV), the block's weight vectors (NV) and a
# broadcast fit in the registers: 32 with AVX-512, 16 with AVX2.
FLOAT_TILE = r"""
#if defined(__AVX512F__)
#define VW 16
#define NV 4
#else
#define VW 8
#define NV 2
#endif
#define BW (NV * VW)
#define MR 6
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf ld(const float *p) { return *(const vfu *)p; }
INLINE void st(float *p, vf v) { *(vfu *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }

/* Every accumulator starts at the block's bias (b: NULL or BW floats). */
INLINE void start_tile(vf acc[MR][NV], const float *b, const int nr)
{
    for (int v = 0; v < NV; v++) {
        const vf bv = b ? ld(b + v * VW) : splat(0.f);
        for (int a = 0; a < nr; a++) acc[a][v] = bv;
    }
}

/* nr rows of accumulators -> y (rows `out` apart), features f.. of the `out` there are. */
INLINE void store_tile(vf acc[MR][NV], float *y, int64_t out, int64_t f, const int nr)
{
    const int64_t valid = out - f < BW ? out - f : BW;
    for (int a = 0; a < nr; a++) {
        float *ya = y + a * out + f;
        if (valid == BW) {
            for (int v = 0; v < NV; v++) st(ya + v * VW, acc[a][v]);
        } else {
            float tmp[BW];
            for (int v = 0; v < NV; v++) st(tmp + v * VW, acc[a][v]);
            memcpy(ya, tmp, sizeof(float) * valid);
        }
    }
}

/* nr rows of x (rows `in` apart) times one block's weight w [in][BW] (+ b) -> y, features f..;
   nr is a constant where inlined, so the loops unroll and the accumulators stay in
   registers. Each output is one sum in input order. */
INLINE void float_tile(const float *x, const float *w, const float *b, float *y, int64_t in,
                       int64_t out, int64_t f, const int nr)
{
    vf acc[MR][NV];
    start_tile(acc, b, nr);
    for (int64_t k = 0; k < in; k++) {
        vf wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = ld(w + k * BW + v * VW);
        for (int a = 0; a < nr; a++) {
            const vf xa = splat(x[a * in + k]);
            for (int v = 0; v < NV; v++) acc[a][v] += wv[v] * xa;
        }
    }
    store_tile(acc, y, out, f, nr);
}

/* TILE(r, nr) over `rows` rows in groups of at most MR, nr a constant in each call. */
#define EACH_ROW_TILE(rows, TILE)                                   \
    for (int64_t r_ = 0; r_ < (rows);) {                            \
        switch ((rows) - r_) {                                      \
        case 1: TILE(r_, 1); r_ += 1; break;                        \
        case 2: TILE(r_, 2); r_ += 2; break;                        \
        case 3: TILE(r_, 3); r_ += 3; break;                        \
        case 4: TILE(r_, 4); r_ += 4; break;                        \
        case 5: TILE(r_, 5); r_ += 5; break;                        \
        default: TILE(r_, MR); r_ += MR; break;                     \
        }                                                           \
    }
"""

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
""" + cpu_pool.C_POOL_TYPES + FLOAT_TILE + r"""
/* x [rows, in]; w [blocks, in, BW], features past `out` zero; bias NULL or [blocks * BW];
   y [rows, out]. */
typedef struct {
    const float *x, *w, *bias;
    float *y;
    int64_t rows, in, out;
} job_t;

/* Every row of block blk: the block's weight (in * BW floats) comes from memory once and
   from cache for the later row groups. */
static void run_block(const void *ctx, int64_t blk)
{
    const job_t *j = ctx;
    const float *w = j->w + blk * j->in * BW, *b = j->bias ? j->bias + blk * BW : NULL;
#define TILE(r, nr) float_tile(j->x + (r) * j->in, w, b, j->y + (r) * j->out, j->in, j->out, \
                               blk * BW, nr)
    EACH_ROW_TILE(j->rows, TILE)
#undef TILE
}

static pantry_run_fn run = NULL;

void pantry_linear_set_pool(pantry_run_fn fn) { run = fn; }

int pantry_linear_block(void) { return BW; }

void pantry_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                   int64_t in, int64_t out)
{
    const int64_t n = (out + BW - 1) / BW;
    const job_t job = {x, w, bias, y, rows, in, out};
    pantry_run_blocks(run, run_block, &job, n);
}
"""


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("linear_pool", _SOURCE, cpu_pool.C_FLAGS)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    handle.pantry_linear.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    handle.pantry_linear.restype = None
    handle.pantry_linear_set_pool.argtypes = [ptr]
    handle.pantry_linear_set_pool.restype = None
    handle.pantry_linear_block.argtypes = []
    handle.pantry_linear_block.restype = ctypes.c_int
    handle.pantry_linear_set_pool(cpu_pool.run_function())
    return handle


_kernel = KernelLibrary("CPU linear pool", "oneDNN", _build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_LINEAR_POOL"))


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call), not switched off, and
    has the pool: on one thread it would lose to oneDNN on several."""
    return cpu_pool.available() and _kernel.available()


def unavailable_reason() -> str | None:
    return cpu_pool.unavailable_reason() or _kernel.unavailable_reason()


@dataclass(frozen=True)
class PoolWeight:
    """A linear's weight blocked for `linear`: [blocks, in, block] and the bias padded to whole
    blocks, features past `out_features` zero."""

    blocked: Tensor
    bias: Tensor | None
    out_features: int


def pack(weight: Tensor, bias: Tensor | None) -> PoolWeight:
    """weight [out, in] float32 (and bias [out]) -> the blocked copy."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert weight.dtype == torch.float32 and weight.dim() == 2 and weight.device.type == "cpu"
    block = lib.pantry_linear_block()
    out, fan_in = weight.shape
    blocks = -(-out // block)
    padded = torch.zeros(blocks * block, fan_in)
    padded[:out] = weight.detach()
    blocked = padded.view(blocks, block, fan_in).transpose(1, 2).contiguous()
    padded_bias = None
    if bias is not None:
        padded_bias = torch.zeros(blocks * block)
        padded_bias[:out] = bias.detach()
    return PoolWeight(blocked, padded_bias, out)


def linear(x: Tensor, weight: PoolWeight) -> Tensor:
    """x [rows, in] float32, contiguous -> x @ W^T + bias, [rows, out]."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2
    assert x.shape[1] == weight.blocked.shape[1]
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    bias = weight.bias
    lib.pantry_linear(x.data_ptr(), weight.blocked.data_ptr(),
                       None if bias is None else bias.data_ptr(), y.data_ptr(), x.shape[0],
                       x.shape[1], weight.out_features)
    return y
