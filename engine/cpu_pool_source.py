"""The C source of engine.cpu_pool: the pool's job word, its helpers (spinning, then sleeping),
its far helpers (sleeping until a far job) and its read-ahead; built and driven from there."""

from __future__ import annotations

# What a kernel library's C declares to take the pool (its `*_set_pool(pantry_run_fn)`).
C_POOL_TYPES = r"""
typedef void (*pantry_block_fn)(const void *ctx, int64_t blk);
typedef void (*pantry_run_fn)(pantry_block_fn fn, const void *ctx, int64_t blocks);

/* fn over blocks [0, n) on the pool `run`, or on the caller alone before a pool is set. */
static inline void pantry_run_blocks(pantry_run_fn run, pantry_block_fn fn, const void *ctx,
                                     int64_t n)
{
    if (!run) {
        for (int64_t b = 0; b < n; b++) fn(ctx, b);
        return;
    }
    run(fn, ctx, n);
}
"""

# For kernel libraries whose blocks need more memory than a helper's stack: each thread's
# scratch, kept from job to job, 64-byte aligned, freed when the thread exits (the pool's
# helpers are joined and started again at every CPU switch). Needs <pthread.h>, <stdlib.h>.
C_THREAD_SCRATCH = r"""
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static __thread float *scratch;
static __thread int64_t scratch_floats;
static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }

/* This thread's scratch of at least `floats`; NULL if memory ran out. */
static float *scratch_for(int64_t floats)
{
    if (floats > scratch_floats) {
        pthread_once(&scratch_once, make_scratch_key);
        free(scratch);
        scratch = aligned_alloc(64, (size_t)((floats * 4 + 63) / 64 * 64));
        scratch_floats = scratch ? floats : 0;
        pthread_setspecific(scratch_key, scratch);
    }
    return scratch;
}
"""

SOURCE = r"""
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

/* Far helpers: threads on CPUs the caller's engine does not compute on (decode's, while a
   prefill engine computes on the rest). They never spin: each sleeps until a far job wakes it,
   claims what blocks are left, and sleeps again, so the engine on their CPUs loses them only
   while they work. The caller waits only for blocks they claimed, like any helper's. Switched
   off, they stay, asleep (no far job wakes them): decode switches at every prefill pass, and
   joining a thread parked on a busy CPU would wait for that CPU. */
#define MAX_FAR 8
static struct {
    _Alignas(64) _Atomic uint32_t futex;
    _Atomic int stop;
    _Atomic int active;
    _Atomic int64_t helped;
    _Atomic int tids[MAX_FAR];
    pthread_t threads[MAX_FAR];
    int count;
} R;

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

/* A helper's turn: block c of job gen, claimed, then every block it can claim after, counted
   in `helped`. The caller waits for claimed blocks: the job cannot change meanwhile. */
static void work_from(uint32_t gen, int64_t c, _Atomic int64_t *helped)
{
    const pantry_block_fn fn = P.fn;
    const void *ctx = P.ctx;
    do {
        fn(ctx, c);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
        atomic_fetch_add_explicit(helped, 1, memory_order_relaxed);
    } while ((c = claim(gen)) >= 0);
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
        const int64_t c = claim(seen);
        if (c >= 0) work_from(seen, c, &P.helped);
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
    R.count = 0;
    atomic_store(&R.active, 0);
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

static void *far_main(void *arg)
{
    const int i = (int)(intptr_t)arg;
    atomic_store(&R.tids[i], (int)syscall(SYS_gettid));
    for (;;) {
        /* The futex is read before looking for blocks: a job posted after the look bumps it,
           so the wait returns at once. */
        const uint32_t f = atomic_load(&R.futex);
        if (atomic_load(&R.stop)) return NULL;
        const uint32_t gen = (uint32_t)(atomic_load_explicit(&P.word, memory_order_acquire) >> 32);
        const int64_t c = claim(gen);
        if (c >= 0) work_from(gen, c, &R.helped);
        syscall(SYS_futex, &R.futex, FUTEX_WAIT_PRIVATE, f, NULL, NULL, 0);
    }
}

static void wake_far(void)
{
    atomic_fetch_add(&R.futex, 1);
    syscall(SYS_futex, &R.futex, FUTEX_WAKE_PRIVATE, MAX_FAR, NULL, NULL, 0);
}

/* `count` far helpers switched on (the old ones kept if as many, else stopped and new ones
   started), or 0: switched off, left asleep. Returns how many are on. Their thread ids are
   `pantry_pool_far_tid(i)`: new ones start on the caller's CPUs, which the caller changes. */
int pantry_pool_far(int count)
{
    pthread_mutex_lock(&P.call);
    const int want = count < MAX_FAR ? count : MAX_FAR;
    if (want > 0 && want != R.count) {
        atomic_store(&R.stop, 1);
        wake_far();
        for (int i = 0; i < R.count; i++) pthread_join(R.threads[i], NULL);
        R.count = 0;
        atomic_store(&R.stop, 0);
    }
    for (int i = R.count; i < want; i++) {
        atomic_store(&R.tids[R.count], 0);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 << 10);
        if (pthread_create(&R.threads[R.count], &attr, far_main, (void *)(intptr_t)R.count) == 0)
            R.count++;
        pthread_attr_destroy(&attr);
    }
    atomic_store(&R.active, want > 0 && R.count > 0);
    pthread_mutex_unlock(&P.call);
    return atomic_load(&R.active) ? R.count : 0;
}

int pantry_pool_far_tid(int i)
{
    if (i < 0 || i >= R.count) return 0;
    int tid;
    while ((tid = atomic_load(&R.tids[i])) == 0) sched_yield();
    return tid;
}

int64_t pantry_pool_far_helped(void) { return atomic_load(&R.helped); }

static void run_job(pantry_block_fn fn, const void *ctx, int64_t n, int far)
{
    stop_prefetch();
    /* One block, no helpers, or another thread's job running: all here. */
    if (n < 2 || (P.helpers == 0 && !far) || pthread_mutex_trylock(&P.call) != 0) {
        for (int64_t c = 0; c < n; c++) fn(ctx, c);
        return;
    }
    if (n > 0xffff) { /* the word counts 16 bits of blocks: the rest on the caller */
        pthread_mutex_unlock(&P.call);
        run_job(fn, ctx, 0xffff, far);
        for (int64_t c = 0xffff; c < n; c++) fn(ctx, c);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    const uint32_t gen = ++P.gen;
    atomic_store(&P.word, (uint64_t)gen << 32 | (uint64_t)n << 16);
    if (atomic_load(&P.sleepers) > 0) wake_helpers();
    if (far) wake_far();
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

void pantry_pool_run(pantry_block_fn fn, const void *ctx, int64_t n) { run_job(fn, ctx, n, 0); }

/* A job worth waking the far helpers for (a long sequence's attention); without far helpers,
   pantry_pool_run. */
void pantry_pool_run_far(pantry_block_fn fn, const void *ctx, int64_t n)
{
    run_job(fn, ctx, n, atomic_load_explicit(&R.active, memory_order_relaxed));
}
"""
