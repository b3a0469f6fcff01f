"""PoolLoader against a real pool: pool hits land in vLLM-style pages from the scheduler's
match, checked, through a reused staging buffer; bad objects are misses, never pages."""

from __future__ import annotations

import pickle

import pytest
import torch

from connectors.vllm_loader import PoolLoader, select
from connectors.vllm_pages import PagedKV
from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient


def _caches(num_blocks: int, seed: int | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed or 0)
    return {f"layers.{i}.attn": (torch.randn(num_blocks, 3, 32, 8, generator=g) if seed is not None
                                 else torch.zeros(num_blocks, 3, 32, 8)) for i in range(4)}


KEYS = [f"{i:032x}" for i in range(1, 6)]


@pytest.fixture
def stored(pool_address: str) -> tuple[KVStoreClient, dict[str, torch.Tensor], PagedKV]:
    """Blocks 0..4 of a source instance stored under KEYS."""
    src = _caches(8, seed=1)
    paged = PagedKV(src, 8, "vllm:test")
    pages = paged.gather(range(5))
    client = KVStoreClient(pool_address, host_id="loader-test")
    assert client.put_many([(k, memoryview(pages[i]).cast("B")) for i, k in enumerate(KEYS)],
                           paged.layout) == [True] * 5
    yield client, src, paged
    client.close()


def test_a_match_lands_in_the_pages_through_a_small_staging_buffer(stored) -> None:
    client, src, paged = stored
    dst = _caches(8, seed=None)
    dst_paged = PagedKV(dst, 8, "vllm:test")
    # Two blocks of staging: five blocks take three reads.
    loader = PoolLoader(client, dst_paged, staging_bytes=2 * dst_paged.block_nbytes + 1)
    match = client.match_prefix(KEYS)
    assert match.matched == 5
    plan = pickle.loads(pickle.dumps(select(match, range(1, 5))))  # scheduler -> worker
    got = loader.load(plan, (7, 6, 0, 3))
    assert (got.loaded, got.failed, got.damaged) == (4, (), ())
    for name in src:
        for s, d in zip((1, 2, 3, 4), (7, 6, 0, 3), strict=True):
            assert torch.equal(dst[name][d], src[name][s])
        assert torch.count_nonzero(dst[name][1]) == 0


def test_damaged_and_foreign_objects_are_misses(stored) -> None:
    client, src, paged = stored
    match = client.match_prefix(KEYS)
    segment = client.status().nodes[0].node.segment_path
    loc = match.locations[1]
    with open(segment, "r+b") as f:  # flip the last payload bytes of block 1
        f.seek(loc.offset + loc.length - 4)
        f.write(b"\xff\xff\xff\xff")
    # Another layout's object of the same size under KEYS[2], one of another size under KEYS[3].
    client.remove([KEYS[2], KEYS[3]])
    same = BlockLayout("vllm:other", "float32", paged.layout.shape)
    assert client.put_many([(KEYS[2], bytes(paged.block_nbytes))], same) == [True]
    assert client.put_many([(KEYS[3], bytes(64))], BlockLayout("vllm:test", "float32",
                                                                (1, 16))) == [True]
    match = client.match_prefix(KEYS)
    dst = _caches(8, seed=None)
    loader = PoolLoader(client, PagedKV(dst, 8, "vllm:test"), staging_bytes=1 << 20)
    got = loader.load(select(match, range(5)), (0, 1, 2, 3, 4))
    assert (got.loaded, sorted(got.failed), got.damaged) == (2, [1, 2, 3], (KEYS[1],))
    for name in src:
        assert torch.equal(dst[name][0], src[name][0])
        assert torch.equal(dst[name][4], src[name][4])
        for refused in (1, 2, 3):  # refused bytes never reach a page
            assert torch.count_nonzero(dst[name][refused]) == 0
