"""Few-row float32 linears (a decode step's matmuls) on CPU, on a thread pool of our own.

A decode step on CPU is ~121 small matmuls. The engines run torch with OMP_WAIT_POLICY=PASSIVE
(prefill shares the cores: spinning OpenMP threads would steal its cycles), so torch's second
OpenMP thread sleeps after every op and a futex wake (tens of us) comes before it helps with
the next; at few rows a matmul is only ~50-300 us of weight streaming. Here the caller plus one
helper thread per extra core (`set_threads`) compute y = x @ W^T (+ bias):
- a helper spins (pause, yielding the core every few us to anything else runnable) for SPIN_US
  after the last job it saw, then sleeps on a futex: within a step, whose matmuls follow each
  other within tens of us, it never sleeps; between steps it does not burn the core;
- a job is split into blocks of output features claimed one at a time by compare-and-swap, by
  the caller and the helpers alike. The caller never waits for a helper that has claimed
  nothing (a helper descheduled by prefill on its core leaves every block to the caller), only
  for blocks a helper has claimed and not finished;
- the weight is stored blocked ([blocks, in, BW], `pack`): a block's BW output features are
  vectors of accumulators, each input element broadcast, each weight vector used for up to six
  input rows while loaded, so the weight streams once per call for any number of rows and
  there is no horizontal sum.
Each output element is one thread's sum in a fixed order, so results do not depend on the
number of threads or on who claimed what.

Measured per matmul and per decode step: engine/packed_linear.py's docstring. While prefill
computes beside decode (bench/interference.py --quick --setups disaggregated, 2 streams, this
pool on -> off, PANTRY_CPU_LINEAR_POOL): TBT p50 32-33 vs 62 ms, p99 47-54 vs 80 ms, the
streams' tok/s 56-58 vs 32, the prompts' TTFT p50 12.9-13.2 vs 12.5 s. The decode attention
kernel stays on torch's OpenMP threads: run on this pool instead, its time at 8 streams of 1024
positions fell ~9% (23-26 vs 25-27 ms a step), inside a whole step's noise here.

The C code is built on first use (engine.kernel_build) and loaded with ctypes, which releases
the GIL for the call. `available()` is False where no compiler works, with PANTRY_CPU_KERNELS=0
(every C kernel off) or PANTRY_CPU_LINEAR_POOL=0 (this one off), and callers keep oneDNN. The
helpers are plain pthreads: they never block interpreter shutdown (the process exits around
them), and a forked child, which has none, runs its calls on the caller alone.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernel_build import KernelLibrary, compile_library

# How long an idle helper spins before it sleeps. A step's matmuls come tens of us apart;
# measured 8 streams, 20 / 200 / 1000 us: the longer the window, the faster the matmuls but the
# slower the attention kernel (torch's OpenMP thread then waits for the helper's core); 200 us
# was the best step.
SPIN_US = 200
# At most this many rows take the pool (decode batches); larger inputs (prefill chunks) stay on
# oneDNN. Measured (module docstring of engine/packed_linear.py): the pool is faster up to 32
# rows and about even from 64.
MAX_ROWS = 32

_SOURCE = r"""
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ __volatile__("yield")
#else
#define PAUSE() do { } while (0)
#endif

/* A block of output features is NV vectors of VW floats; with MR input rows at a time, the
   accumulators (MR * NV), the block's weight vectors (NV) and a broadcast fit in the
   registers: 32 with AVX-512, 16 with AVX2. */
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

/* x [rows, in]; w [blocks, in, BW], features past `out` zero; bias NULL or [blocks * BW];
   y [rows, out]. */
typedef struct {
    const float *x, *w, *bias;
    float *y;
    int64_t rows, in, out;
} job_t;

/* Rows [r, r + nr) of block blk; nr is a constant where inlined, so the loops unroll and the
   accumulators stay in registers. */
INLINE void tile(const job_t *j, int64_t blk, int64_t r, const int nr)
{
    const int64_t in = j->in;
    const float *w = j->w + blk * in * BW, *x = j->x + r * in;
    vf acc[MR][NV];
    for (int v = 0; v < NV; v++) {
        const vf b = j->bias ? ld(j->bias + blk * BW + v * VW) : splat(0.f);
        for (int a = 0; a < nr; a++) acc[a][v] = b;
    }
    for (int64_t k = 0; k < in; k++) {
        vf wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = ld(w + k * BW + v * VW);
        for (int a = 0; a < nr; a++) {
            const vf xa = splat(x[a * in + k]);
            for (int v = 0; v < NV; v++) acc[a][v] += wv[v] * xa;
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

/* Every row of block blk: the block's weight (in * BW floats) comes from memory once and
   from cache for the later row groups. */
static void run_block(const job_t *j, int64_t blk)
{
    for (int64_t r = 0; r < j->rows;) {
        switch (j->rows - r) {
        case 1: tile(j, blk, r, 1); r += 1; break;
        case 2: tile(j, blk, r, 2); r += 2; break;
        case 3: tile(j, blk, r, 3); r += 3; break;
        case 4: tile(j, blk, r, 4); r += 4; break;
        case 5: tile(j, blk, r, 5); r += 5; break;
        default: tile(j, blk, r, MR); r += MR; break;
        }
    }
}

/* The pool. A job's blocks are claimed from one word, generation:32 | blocks:16 | next:16, by
   compare-and-swap: a claim succeeds only for the job whose generation it read, so a helper
   that wakes late never takes a block of the next job, and the job's description (written
   before its generation) is complete for whoever claims. */
#define MAX_HELPERS 63
static struct {
    _Alignas(64) _Atomic uint64_t word;
    _Alignas(64) _Atomic int64_t done;     /* blocks finished by helpers, this job */
    _Atomic int64_t helped;                /* and since the library was loaded */
    _Alignas(64) _Atomic int sleepers;
    _Atomic uint32_t futex;
    _Atomic int stop;
    job_t job;
    uint32_t gen;
    int helpers;
    int64_t spin_ns;
    pthread_t threads[MAX_HELPERS];
    pthread_mutex_t call;                  /* one job at a time; held while resizing */
} P = {.call = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t claim(uint32_t gen)
{
    uint64_t w = atomic_load_explicit(&P.word, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != gen) return -1;
        const int64_t next = (int64_t)(w & 0xffff), n = (int64_t)((w >> 16) & 0xffff);
        if (next >= n) return -1;
        if (atomic_compare_exchange_weak_explicit(&P.word, &w, w + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return next;
    }
}

static void *helper_main(void *arg)
{
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&P.word) >> 32);
    for (;;) {
        int64_t deadline = now_ns() + P.spin_ns;
        uint64_t w;
        for (unsigned it = 1;; it++) {
            w = atomic_load_explicit(&P.word, memory_order_acquire);
            if ((uint32_t)(w >> 32) != seen) break;
            if (atomic_load_explicit(&P.stop, memory_order_relaxed)) return NULL;
            PAUSE();
            if ((it & 63) == 0) {
                /* Anything else runnable on this core (an OpenMP thread, prefill) goes
                   first; with nothing else this returns at once. */
                sched_yield();
                if (now_ns() > deadline) {
                    /* Sleep. The futex value is read before announcing ourselves, the job
                       word after: a job published in between is seen here, or its caller
                       sees a sleeper and bumps the futex, so the wait returns at once. */
                    const uint32_t f = atomic_load(&P.futex);
                    atomic_fetch_add(&P.sleepers, 1);
                    if ((uint32_t)(atomic_load(&P.word) >> 32) == seen && !atomic_load(&P.stop))
                        syscall(SYS_futex, &P.futex, FUTEX_WAIT_PRIVATE, f, NULL, NULL, 0);
                    atomic_fetch_sub(&P.sleepers, 1);
                    deadline = now_ns() + P.spin_ns;
                }
            }
        }
        seen = (uint32_t)(w >> 32);
        int64_t c = claim(seen);
        if (c < 0) continue;
        const job_t job = P.job; /* the caller waits for our blocks: it cannot change yet */
        do {
            run_block(&job, c);
            atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
            atomic_fetch_add_explicit(&P.helped, 1, memory_order_relaxed);
        } while ((c = claim(seen)) >= 0);
    }
}

static void wake_helpers(void)
{
    atomic_fetch_add(&P.futex, 1);
    syscall(SYS_futex, &P.futex, FUTEX_WAKE_PRIVATE, MAX_HELPERS, NULL, NULL, 0);
}

static void forked_child(void)
{
    /* The helpers did not cross the fork: the child's calls run on the caller alone. */
    P.helpers = 0;
    pthread_mutex_init(&P.call, NULL);
}

/* The pool becomes the caller and threads - 1 helpers (the old ones stopped first); returns
   the helpers started. */
int pantry_pool_resize(int threads, int64_t spin_ns)
{
    static int registered = 0;
    pthread_mutex_lock(&P.call);
    if (!registered) {
        pthread_atfork(NULL, NULL, forked_child);
        registered = 1;
    }
    atomic_store(&P.stop, 1);
    wake_helpers();
    for (int i = 0; i < P.helpers; i++) pthread_join(P.threads[i], NULL);
    P.helpers = 0;
    atomic_store(&P.stop, 0);
    P.spin_ns = spin_ns;
    const int want = threads - 1 < MAX_HELPERS ? threads - 1 : MAX_HELPERS;
    for (int i = 0; i < want; i++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 << 10);
        if (pthread_create(&P.threads[P.helpers], &attr, helper_main, NULL) == 0) P.helpers++;
        pthread_attr_destroy(&attr);
    }
    pthread_mutex_unlock(&P.call);
    return P.helpers;
}

int pantry_linear_block(void) { return BW; }

int64_t pantry_pool_helped(void) { return atomic_load(&P.helped); }

void pantry_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                   int64_t in, int64_t out)
{
    const int64_t n = (out + BW - 1) / BW; /* < 65536: checked when the weight is packed */
    const job_t job = {x, w, bias, y, rows, in, out};
    /* One block, no helpers, or another thread's job running: all here. */
    if (n < 2 || P.helpers == 0 || pthread_mutex_trylock(&P.call) != 0) {
        for (int64_t c = 0; c < n; c++) run_block(&job, c);
        return;
    }
    P.job = job;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    const uint32_t gen = ++P.gen;
    atomic_store(&P.word, (uint64_t)gen << 32 | (uint64_t)n << 16);
    if (atomic_load(&P.sleepers) > 0) wake_helpers();
    int64_t mine = 0, c;
    while ((c = claim(gen)) >= 0) {
        run_block(&job, c);
        mine++;
    }
    /* Only blocks a helper claimed and has not finished are left: short. */
    for (unsigned it = 1; atomic_load_explicit(&P.done, memory_order_acquire) + mine < n; it++) {
        PAUSE();
        if ((it & 63) == 0) sched_yield();
    }
    pthread_mutex_unlock(&P.call);
}
"""

_lock = threading.Lock()
_threads = 0  # the pool's size once started; 0 before


def _flags() -> list[str]:
    # -march=native: the cache key names the CPU, so a library is only loaded where built.
    return ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-pthread",
            "-fPIC", "-shared"]


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("linear_pool", _SOURCE, _flags())))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    handle.pantry_linear.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    handle.pantry_linear.restype = None
    handle.pantry_pool_resize.argtypes = [ctypes.c_int, i64]
    handle.pantry_pool_resize.restype = ctypes.c_int
    handle.pantry_linear_block.argtypes = []
    handle.pantry_linear_block.restype = ctypes.c_int
    handle.pantry_pool_helped.argtypes = []
    handle.pantry_pool_helped.restype = i64
    return handle


_kernel = KernelLibrary("CPU linear pool", "oneDNN", _build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_LINEAR_POOL"))


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call) and not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


def set_threads(threads: int) -> None:
    """The pool becomes the calling thread plus `threads - 1` helpers (1: the caller alone)."""
    global _threads
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert threads >= 1
    lib.pantry_pool_resize(threads, SPIN_US * 1000)
    _threads = threads


def threads() -> int:
    """The pool's size, started if it is not: torch's thread count, at most the CPUs this
    process may run on (a helper sharing the caller's only core would just take turns)."""
    if not _threads:
        with _lock:
            if not _threads:
                set_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))
    return _threads


def helped_blocks() -> int:
    """Blocks the helpers have computed since the library was loaded (the rest: callers)."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_pool_helped())


@dataclass(frozen=True)
class PoolWeight:
    """A linear's weight blocked for `linear`: [blocks, in, block] and the bias padded to whole
    blocks, features past `out_features` zero."""

    blocked: Tensor
    bias: Tensor | None
    out_features: int


def pack(weight: Tensor, bias: Tensor | None) -> PoolWeight:
    """weight [out, in] float32 (and bias [out]) -> the blocked copy; starts the pool."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert weight.dtype == torch.float32 and weight.dim() == 2 and weight.device.type == "cpu"
    block = lib.pantry_linear_block()
    out, fan_in = weight.shape
    blocks = -(-out // block)
    assert blocks < 1 << 16, "a job's blocks are counted in 16 bits"
    padded = torch.zeros(blocks * block, fan_in)
    padded[:out] = weight.detach()
    blocked = padded.view(blocks, block, fan_in).transpose(1, 2).contiguous()
    padded_bias = None
    if bias is not None:
        padded_bias = torch.zeros(blocks * block)
        padded_bias[:out] = bias.detach()
    threads()
    return PoolWeight(blocked, padded_bias, out)


def linear(x: Tensor, weight: PoolWeight) -> Tensor:
    """x [rows, in] float32, contiguous -> x @ W^T + bias, [rows, out]."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2
    assert x.shape[1] == weight.blocked.shape[1]
    threads()
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    bias = weight.bias
    lib.pantry_linear(x.data_ptr(), weight.blocked.data_ptr(),
                       None if bias is None else bias.data_ptr(), y.data_ptr(), x.shape[0],
                       x.shape[1], weight.out_features)
    return y
