"""A thread pool of our own for the engine's C kernels on CPU.

The engines run torch with OMP_WAIT_POLICY=PASSIVE (prefill shares the cores: spinning OpenMP
threads would steal its cycles), so torch's second OpenMP thread sleeps after every op and a
futex wake (tens of us) comes before it helps with the next. A decode step is ~121 small
matmuls of 50-300 us and a layer's elementwise ops take tens to hundreds of us: that wake is a
large share of each. This pool is the calling thread plus one helper pthread per extra core
(`set_threads`):
- a helper spins (pause, yielding the core every few us to anything else runnable) for SPIN_US
  after the last job it saw, then sleeps on a futex: within a step, whose kernels follow each
  other within tens of us, it never sleeps; between steps it does not burn the core;
- a job is `blocks` calls of one C function, fn(ctx, b), claimed one at a time by
  compare-and-swap, by the caller and the helpers alike. The caller never waits for a helper
  that has claimed nothing (a helper descheduled by prefill on its core leaves every block to
  the caller), only for blocks a helper has claimed and not finished.

Between jobs an idle helper can read a posted range into cache (`prefetch`): with
PANTRY_CPU_READ_AHEAD=1 decode's linears post the weight the step reads next, so the memory
works while the caller runs Python (engine.packed_linear.read_ahead_in_order says when that pays).

A kernel library takes the pool's run function once (`run_function()`, a C address) and its
entry points call it with a context on their own stack: no Python per block, and the ctypes
call into the kernel releases the GIL. Each kernel writes every output element from one block,
so results do not depend on the number of threads or on who claimed what.

`available()` is False where no compiler works, with PANTRY_CPU_KERNELS=0 (every C kernel off)
or PANTRY_CPU_POOL=0; the kernels then run their blocks on the caller, or their callers keep
torch. The helpers are plain pthreads: they never block interpreter shutdown (the process
exits around them), and a forked child, which has none, runs its jobs on the caller alone.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from torch import Tensor

from engine.kernel_build import KernelLibrary, compile_library

# How long an idle helper spins before it sleeps. A step's matmuls come tens of us apart;
# measured 8 streams, 20 / 200 / 1000 us: the longer the window, the faster the matmuls but the
# slower the attention kernel (torch's OpenMP thread then waits for the helper's core); 200 us
# was the best step.
SPIN_US = 200

# The flags every kernel library is built with. -march=native: the cache key names the CPU,
# so a library is only loaded where built.
C_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-pthread", "-fPIC",
           "-shared"]

# What a kernel library's C declares to take the pool (its `*_set_pool(pantry_run_fn)`).
C_POOL_TYPES = r"""
typedef void (*pantry_block_fn)(const void *ctx, int64_t blk);
typedef void (*pantry_run_fn)(pantry_block_fn fn, const void *ctx, int64_t blocks);
"""

_SOURCE = r"""
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
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
""" + C_POOL_TYPES + r"""
/* A job's blocks are claimed from one word, generation:32 | blocks:16 | next:16, by
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
    pantry_block_fn fn;
    const void *ctx;
    uint32_t gen;
    int helpers;
    int64_t spin_ns;
    pthread_t threads[MAX_HELPERS];
    pthread_mutex_t call;                  /* one job at a time; held while resizing */
} P = {.call = PTHREAD_MUTEX_INITIALIZER};

/* Bytes an idle helper reads into cache while the caller runs Python between jobs (the next
   weight of a memory-bound decode step), claimed in chunks of 64 KiB; every job takes the
   range back first (`stop_prefetch`), waiting at most for the chunk a helper is reading. The
   range is published with `next` last, so a claim always sees its own base and end; posts
   are serialized by P.call. */
#define PREFETCH_CHUNK (64 << 10)
static struct {
    _Alignas(64) _Atomic int64_t next;
    _Atomic int64_t end;
    _Atomic int busy;
    const char *_Atomic base;
    _Atomic int64_t chunks;                /* read since the library was loaded */
} F;
static volatile float prefetch_sink;

static void prefetch_some(void)
{
    atomic_fetch_add(&F.busy, 1);
    const int64_t c = atomic_fetch_add(&F.next, PREFETCH_CHUNK);
    const int64_t end = atomic_load(&F.end);
    if (c < end) {
        const float *p = (const float *)(atomic_load(&F.base) + c);
        const int64_t n = ((end - c < PREFETCH_CHUNK) ? end - c : PREFETCH_CHUNK) / 4;
        float acc = 0.f;
        for (int64_t i = 0; i < n; i += 16) acc += p[i];
        prefetch_sink = acc;
        atomic_fetch_add_explicit(&F.chunks, 1, memory_order_relaxed);
    }
    atomic_fetch_sub(&F.busy, 1);
}

static void stop_prefetch(void)
{
    atomic_store(&F.next, INT64_MAX / 2);
    while (atomic_load(&F.busy) > 0) PAUSE();
}


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
            if (atomic_load_explicit(&F.next, memory_order_relaxed) <
                atomic_load_explicit(&F.end, memory_order_relaxed)) {
                prefetch_some();
                deadline = now_ns() + P.spin_ns;
                continue;
            }
            PAUSE();
            if ((it & 63) == 0) {
                /* Anything else runnable on this core (an OpenMP thread, prefill) goes
                   first; with nothing else this returns at once. */
                sched_yield();
                if (now_ns() > deadline) {
                    /* Sleep. The futex value is read before announcing ourselves, the job
                       word (and read-ahead range) after: a job or range published in between
                       is seen here, or its poster sees a sleeper and bumps the futex, so the
                       wait returns at once. */
                    const uint32_t f = atomic_load(&P.futex);
                    atomic_fetch_add(&P.sleepers, 1);
                    if ((uint32_t)(atomic_load(&P.word) >> 32) == seen && !atomic_load(&P.stop)
                        && atomic_load(&F.next) >= atomic_load(&F.end))
                        syscall(SYS_futex, &P.futex, FUTEX_WAIT_PRIVATE, f, NULL, NULL, 0);
                    atomic_fetch_sub(&P.sleepers, 1);
                    deadline = now_ns() + P.spin_ns;
                }
            }
        }
        seen = (uint32_t)(w >> 32);
        int64_t c = claim(seen);
        if (c < 0) continue;
        /* The caller waits for our blocks: the job cannot change yet. */
        const pantry_block_fn fn = P.fn;
        const void *ctx = P.ctx;
        do {
            fn(ctx, c);
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

/* The caller keeps [p, p + bytes) mapped until its next post or job. Skipped (returns 0) with
   no helpers or while another thread's job runs. A sleeping helper is woken for it. */
int pantry_pool_prefetch(const void *p, int64_t bytes)
{
    if (P.helpers == 0 || pthread_mutex_trylock(&P.call) != 0) return 0;
    stop_prefetch();
    atomic_store(&F.base, (const char *)p);
    atomic_store(&F.end, bytes);
    atomic_store(&F.next, 0);
    if (atomic_load(&P.sleepers) > 0) wake_helpers();
    pthread_mutex_unlock(&P.call);
    return 1;
}

static void forked_child(void)
{
    /* The helpers did not cross the fork: the child's jobs run on the caller alone. */
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

int64_t pantry_pool_helped(void) { return atomic_load(&P.helped); }

int64_t pantry_pool_prefetched(void) { return atomic_load(&F.chunks); }



void pantry_pool_run(pantry_block_fn fn, const void *ctx, int64_t n)
{
    stop_prefetch();
    /* One block, no helpers, or another thread's job running: all here. */
    if (n < 2 || P.helpers == 0 || pthread_mutex_trylock(&P.call) != 0) {
        for (int64_t c = 0; c < n; c++) fn(ctx, c);
        return;
    }
    if (n > 0xffff) { /* the word counts 16 bits of blocks: the rest on the caller */
        pthread_mutex_unlock(&P.call);
        pantry_pool_run(fn, ctx, 0xffff);
        for (int64_t c = 0xffff; c < n; c++) fn(ctx, c);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    const uint32_t gen = ++P.gen;
    atomic_store(&P.word, (uint64_t)gen << 32 | (uint64_t)n << 16);
    if (atomic_load(&P.sleepers) > 0) wake_helpers();
    int64_t mine = 0, c;
    while ((c = claim(gen)) >= 0) {
        fn(ctx, c);
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


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("cpu_pool", _SOURCE, C_FLAGS)))
    handle.pantry_pool_resize.argtypes = [ctypes.c_int, ctypes.c_int64]
    handle.pantry_pool_resize.restype = ctypes.c_int
    handle.pantry_pool_helped.argtypes = []
    handle.pantry_pool_helped.restype = ctypes.c_int64
    handle.pantry_pool_prefetched.argtypes = []
    handle.pantry_pool_prefetched.restype = ctypes.c_int64
    handle.pantry_pool_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    handle.pantry_pool_prefetch.restype = ctypes.c_int
    return handle


_kernel = KernelLibrary("CPU thread pool", "the caller alone",
                        _build, ("PANTRY_CPU_KERNELS", "PANTRY_CPU_POOL"))


def available() -> bool:
    """Whether the pool is built and loaded (built on the first call) and not switched off."""
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


_prefetching: Tensor | None = None  # the range posted last, kept alive while a helper may read it


def prefetch(tensor: Tensor) -> None:
    """Idle helpers read `tensor` (contiguous, on the CPU) into cache until the next job starts:
    what a memory-bound kernel reads next comes from cache for the part they reached. Nothing
    is computed; results never depend on it."""
    global _prefetching
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    if lib.pantry_pool_prefetch(tensor.data_ptr(), tensor.numel() * tensor.element_size()):
        _prefetching = tensor


def prefetched_chunks() -> int:
    """Chunks of 64 KiB the helpers have read ahead since the library was loaded."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_pool_prefetched())


def run_function() -> int | None:
    """The C address of `pantry_pool_run` (a `pantry_run_fn`) with the pool started, for a
    kernel library's `*_set_pool`; None where the pool is unavailable."""
    if not available():
        return None
    threads()
    lib = _kernel.lib
    assert lib is not None
    address = ctypes.cast(lib.pantry_pool_run, ctypes.c_void_p).value
    assert address is not None
    return address
