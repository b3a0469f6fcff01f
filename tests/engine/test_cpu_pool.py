"""The generic pool through a C kernel of the test's own: every block run exactly once, on one
and two threads, with far helpers, past the 16-bit block count, from two callers at once, and
switched off."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import cpu_linear_pool, cpu_pool
from pantry.common.c_library import compile_library
from tests.helpers.pool_threads import pool_size_restored

pytestmark = pytest.mark.skipif(not cpu_pool.available(),
                                reason=f"no CPU pool: {cpu_pool.unavailable_reason()}")

# Each block adds its index + 1 to its own counter (atomically, so a block run twice shows)
# and spends a few microseconds, so the helper gets a share.
_COUNTER_SOURCE = r"""
#include <stdint.h>
""" + cpu_pool.C_POOL_TYPES + r"""
typedef struct { int64_t *counts; } ctx_t;
static pantry_run_fn run = 0;
void counter_set_pool(pantry_run_fn fn) { run = fn; }
static void count(const void *ctx, int64_t blk)
{
    const ctx_t *c = ctx;
    volatile double spin = 0;
    for (int i = 0; i < 2000; i++) spin += i;
    __atomic_fetch_add(&c->counts[blk], blk + 1, __ATOMIC_RELAXED);
}
void counter_run(int64_t *counts, int64_t blocks)
{
    const ctx_t c = {counts};
    run(count, &c, blocks);
}
"""


def _counter(name: str, far: bool) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(compile_library(name, _COUNTER_SOURCE, cpu_pool.C_FLAGS)))
    lib.counter_set_pool.argtypes = [ctypes.c_void_p]
    lib.counter_run.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.counter_set_pool(cpu_pool.run_function(far=far))
    return lib


@pytest.fixture(scope="module")
def counter() -> ctypes.CDLL:
    return _counter("test_counter", far=False)


@pytest.fixture(scope="module")
def far_counter() -> ctypes.CDLL:
    """The same kernel posting far jobs (pantry_pool_run_far)."""
    return _counter("test_counter_far", far=True)


def _run(counter: ctypes.CDLL, blocks: int) -> torch.Tensor:
    counts = torch.zeros(blocks, dtype=torch.int64)
    counter.counter_run(counts.data_ptr(), blocks)
    return counts


@pytest.mark.parametrize("blocks", [0, 1, 2, 3, 1000, 70_000])
def test_every_block_runs_exactly_once(counter: ctypes.CDLL, pool_threads: int,
                                       blocks: int) -> None:
    assert torch.equal(_run(counter, blocks), torch.arange(1, blocks + 1))


def test_the_helper_takes_blocks(counter: ctypes.CDLL) -> None:
    with pool_size_restored():
        cpu_pool.set_threads(2)
        helped = cpu_pool.helped_blocks()
        for _ in range(200):  # a busy machine may keep the helper off its core for a while
            _run(counter, 64)
            if cpu_pool.helped_blocks() > helped:
                break
        assert cpu_pool.helped_blocks() > helped


@pytest.mark.parametrize("blocks", [0, 1, 2, 1000, 70_000])
def test_far_jobs_run_every_block_exactly_once(far_counter: ctypes.CDLL, pool_threads: int,
                                               blocks: int) -> None:
    """With and without far helpers, beside the pool's own on two threads."""
    for far in (0, 1, 2, 0):
        assert len(cpu_pool.set_far_helpers(far)) == far
        assert torch.equal(_run(far_counter, blocks), torch.arange(1, blocks + 1))


def test_a_far_helper_takes_blocks_of_a_caller_alone(far_counter: ctypes.CDLL) -> None:
    """A decode engine confined to one CPU runs its pool as the caller alone: a far job's blocks
    are still shared, with the far helper."""
    with pool_size_restored():
        cpu_pool.set_threads(1)
        tids = cpu_pool.set_far_helpers(1)
        assert len(tids) == 1 and os.path.exists(f"/proc/self/task/{tids[0]}")
        helped = cpu_pool.far_helped_blocks()
        for _ in range(200):
            assert torch.equal(_run(far_counter, 64), torch.arange(1, 65))
            if cpu_pool.far_helped_blocks() > helped:
                break
        assert cpu_pool.far_helped_blocks() > helped
        # Switched off, it stays asleep: a far job runs on the caller alone.
        assert cpu_pool.set_far_helpers(0) == []
        assert os.path.exists(f"/proc/self/task/{tids[0]}")
        helped = cpu_pool.far_helped_blocks()
        for _ in range(20):
            assert torch.equal(_run(far_counter, 64), torch.arange(1, 65))
        assert cpu_pool.far_helped_blocks() == helped
        # Back on: the same thread; a different count: new ones.
        assert cpu_pool.set_far_helpers(1) == tids
        two = cpu_pool.set_far_helpers(2)
        assert len(two) == 2 and tids[0] not in two
        assert not os.path.exists(f"/proc/self/task/{tids[0]}")


def test_two_callers_at_once(counter: ctypes.CDLL, pool_threads: int) -> None:
    """The second caller finds the pool busy and runs its blocks alone; both complete."""
    bad: list[int] = []

    def work(blocks: int) -> None:
        for _ in range(30):
            if not torch.equal(_run(counter, blocks), torch.arange(1, blocks + 1)):
                bad.append(blocks)

    workers = [threading.Thread(target=work, args=(n,)) for n in (300, 500)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert bad == []


def _wait_for_chunks(want: int) -> int:
    """Prefetched chunks since `want` was computed, waiting up to 5 s for the helper."""
    deadline = time.monotonic() + 5.0
    while cpu_pool.prefetched_chunks() < want and time.monotonic() < deadline:
        time.sleep(0.001)
    return cpu_pool.prefetched_chunks()


def test_the_helper_reads_a_posted_range_ahead_once(counter: ctypes.CDLL) -> None:
    with pool_size_restored():
        cpu_pool.set_threads(2)
        data = torch.ones(5 << 20, dtype=torch.uint8)  # 80 chunks of 64 KiB
        before = cpu_pool.prefetched_chunks()
        time.sleep(0.01)  # the helper is asleep by now: a post wakes it
        cpu_pool.prefetch(data)
        assert _wait_for_chunks(before + 80) == before + 80
        time.sleep(0.01)
        assert cpu_pool.prefetched_chunks() == before + 80  # each chunk once, then nothing
        # A job takes the range back: what is left of it is never read.
        cpu_pool.prefetch(torch.ones(512 << 20, dtype=torch.uint8))
        assert torch.equal(_run(counter, 100), torch.arange(1, 101))
        taken = cpu_pool.prefetched_chunks()
        time.sleep(0.01)
        assert cpu_pool.prefetched_chunks() == taken < before + 80 + 8192


def test_a_posted_range_stays_mapped_after_its_tensor_is_dropped(counter: ctypes.CDLL) -> None:
    """The pool keeps the posted tensor: freeing its memory (large tensors are unmapped) while
    the helper reads would crash this process."""
    with pool_size_restored():
        cpu_pool.set_threads(2)
        before = cpu_pool.prefetched_chunks()
        cpu_pool.prefetch(torch.ones(256 << 20, dtype=torch.uint8))
        gc.collect()
        for _ in range(20):
            torch.ones(256 << 20, dtype=torch.uint8)  # allocated and freed: unmapped
        assert _wait_for_chunks(before + 1) > before
        assert torch.equal(_run(counter, 10), torch.arange(1, 11))


def test_no_helper_no_read_ahead(counter: ctypes.CDLL) -> None:
    with pool_size_restored():
        cpu_pool.set_threads(1)
        before = cpu_pool.prefetched_chunks()
        cpu_pool.prefetch(torch.ones(1 << 20, dtype=torch.uint8))
        time.sleep(0.01)
        assert cpu_pool.prefetched_chunks() == before


def test_switched_off_the_kernels_that_need_it_are_off(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_pool._kernel, "lib", None)
    monkeypatch.setattr(cpu_pool._kernel, "reason", None)
    monkeypatch.setenv("PANTRY_CPU_POOL", "0")
    assert not cpu_pool.available()
    assert cpu_pool.unavailable_reason() == "PANTRY_CPU_POOL=0"
    assert cpu_pool.run_function() is None
    assert not cpu_linear_pool.available()
    assert cpu_linear_pool.unavailable_reason() == "PANTRY_CPU_POOL=0"
