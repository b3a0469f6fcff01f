"""The C paged decode kernel against the torch paths, on a real paged cache: scattered blocks,
mixed lengths, grouped heads and a sliding window."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import cpu_paged_attention as kernel
from engine import cpu_pool
from engine.attention import reference_paged_attention
from engine.attention_batch import AttentionBatch
from engine.kv_cache import PagedKVCache
from pantry.common.c_library import KernelLibrary
from tests.helpers.pool_threads import pool_size_restored

pytestmark = pytest.mark.skipif(not kernel.available(),
                                reason=f"no CPU kernel: {kernel.unavailable_reason()}")

BLOCK = 16


@pytest.fixture(params=["native", "eight"])
def width(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The kernel as this CPU builds it (sixteen positions at a time with AVX-512), and built
    without AVX-512, as on CPUs that lack it: eight at a time."""
    if request.param == "eight":
        narrow = KernelLibrary("CPU paged attention kernel, eight wide", "torch",
                               lambda: kernel._build(("-mno-avx512f",)))
        assert narrow.available(), narrow.unavailable_reason()
        monkeypatch.setattr(kernel, "_kernel", narrow)
        assert kernel.lanes() == 8
    return kernel.lanes()


# SmolLM2's shape, one KV head per query head, Llama's group of 8, head size 128 (each unrolled
# at compile time), and head size 32 with a group of 12 (the scalar loops).
@pytest.mark.parametrize(("heads", "kv_heads", "hd"),
                         [(9, 3, 64), (4, 4, 64), (8, 1, 64), (8, 2, 128), (12, 1, 32)])
@pytest.mark.parametrize(("lens", "window"), [
    ([1], None),                       # the new token alone
    ([5, 16, 17, 100, 33], None),      # inside a block, exactly one, one past, many
    ([300, 2, 64], 40),                # a window shorter than some sequences
    ([700, 3, 1000, 16], None),        # longer than a span (512): spans merged
    ([1500, 9], 600),                  # a window over two spans, starting mid-block
])
def test_matches_the_reference(heads: int, kv_heads: int, hd: int, lens: list[int],
                               window: int | None, width: int) -> None:
    torch.manual_seed(len(lens) + heads)
    layers, blocks = 3, 200
    kv = PagedKVCache(layers, blocks, BLOCK, kv_heads, hd, torch.float32)
    kv.blocks.normal_()
    free = list(range(blocks))
    random.Random(heads).shuffle(free)  # blocks scattered over the cache, in no order
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lens]
    batch = AttentionBatch.build([1] * len(lens), [n - 1 for n in lens], tables, BLOCK,
                                 sliding_window=window)
    assert batch.decode is not None and batch.decode.seq_lens is not None
    q = torch.randn(len(lens), heads, hd)
    k, v = torch.randn(len(lens), kv_heads, hd), torch.randn(len(lens), kv_heads, hd)
    layer = 1
    # The reference writes the new K/V into the cache, then attends: the kernel reads it there.
    expected = reference_paged_attention(q, k, v, kv.k[layer], kv.v[layer], batch, hd ** -0.5)
    got = kernel.paged_decode_attention_cpu(
        q, kv.k[layer], kv.v[layer], batch.decode.block_table.view(len(lens), -1),
        batch.decode.seq_lens, hd ** -0.5, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_pool.available(), reason="no CPU pool: the kernel runs on the caller")
def test_result_does_not_depend_on_the_pool_threads() -> None:
    """Each span is one block of the pool, computed by one thread in a fixed order, and the spans
    are merged on the caller: bit-identical on one and two threads, and on one with a far
    helper (2140 positions: a far job) taking spans."""
    torch.manual_seed(3)
    lens = [1500, 7, 600, 33]
    kv = PagedKVCache(1, 200, BLOCK, 3, 64, torch.float32)
    kv.blocks.normal_()
    tables, first = [], 0
    for n in lens:
        tables.append(list(range(first, first + -(-n // BLOCK))))
        first += len(tables[-1])
    batch = AttentionBatch.build([1] * len(lens), [n - 1 for n in lens], tables, BLOCK)
    assert batch.decode is not None and batch.decode.seq_lens is not None
    q = torch.randn(len(lens), 9, 64)

    def attend() -> torch.Tensor:
        assert batch.decode is not None and batch.decode.seq_lens is not None
        return kernel.paged_decode_attention_cpu(
            q, kv.k[0], kv.v[0], batch.decode.block_table.view(len(lens), -1),
            batch.decode.seq_lens, 0.125)

    outs = []
    with pool_size_restored():
        for threads in (1, 2, 1):
            cpu_pool.set_threads(threads)
            outs.append(attend())
        assert len(cpu_pool.set_far_helpers(1)) == 1
        helped = cpu_pool.far_helped_blocks()
        for _ in range(200):  # a busy machine may keep the helper off its core for a while
            outs.append(attend())
            if cpu_pool.far_helped_blocks() > helped:
                break
        assert cpu_pool.far_helped_blocks() > helped
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_cached_library_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built once per source, flags and CPU: a second build finds the file and compiles
    nothing."""
    monkeypatch.setenv("PANTRY_KERNEL_CACHE", str(tmp_path))
    kernel._build()
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("paged_decode-") and built[0].endswith(".so")
    monkeypatch.setenv("CC", "/nonexistent/cc")  # would fail if it compiled again
    kernel._build()
    assert sorted(p.name for p in tmp_path.iterdir()) == built


def test_a_max_that_rises_late_rescales_what_came_before(width: int) -> None:
    """Each chunk's scores higher than the last (keys scaled up along the sequence): every
    chunk raises the running max, so the sums so far are rescaled each time; a missed or
    doubled rescale shows in the output."""
    torch.manual_seed(7)
    heads, kv_heads, hd, n = 9, 3, 64, 200
    kv = PagedKVCache(1, 20, BLOCK, kv_heads, hd, torch.float32)
    q = torch.randn(1, heads, hd)
    keys = q.view(heads // kv_heads, kv_heads, hd).mean(0)       # a key each KV head's q favours
    ramp = torch.linspace(0.0, 3.0, n).view(n, 1, 1)
    table = list(range(-(-n // BLOCK)))
    for p in range(n):
        kv.k[0, table[p // BLOCK], p % BLOCK] = keys * ramp[p] + 0.1 * torch.randn(kv_heads, hd)
        kv.v[0, table[p // BLOCK], p % BLOCK] = torch.randn(kv_heads, hd)
    batch = AttentionBatch.build([1], [n - 1], [table], BLOCK)
    assert batch.decode is not None and batch.decode.seq_lens is not None
    last = (0, table[-1], (n - 1) % BLOCK)
    expected = reference_paged_attention(q, kv.k[last].clone().view(1, kv_heads, hd),
                                         kv.v[last].clone().view(1, kv_heads, hd), kv.k[0],
                                         kv.v[0], batch, hd ** -0.5)
    got = kernel.paged_decode_attention_cpu(q, kv.k[0], kv.v[0],
                                            batch.decode.block_table.view(1, -1),
                                            batch.decode.seq_lens, hd ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
