"""Blocks between a paged cache and a real pool: exact round trip, and every kind of bad or
missing object is a miss (the engine computes it), never wrong KV and never an exception."""

from __future__ import annotations

import socket

import pytest
import torch

from engine.kv_cache import PagedKVCache
from engine.pool_transfer import PoolTransfer
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from kvstore.hashing import PoolAddressing
from tests.decode.engine_rig import pool_client, running_pool


def _cache(seed: int) -> PagedKVCache:
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2,
                         head_dim=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


KEYS = PoolAddressing("fp-test", 16).block_keys(list(range(48)), tenant="t")


@pytest.fixture(scope="module")
def pool_address() -> str:  # type: ignore[misc]
    with running_pool("xfer") as address:
        yield address


def test_round_trip_is_exact(pool_address: str) -> None:
    src, dst = _cache(1), _cache(2)
    with pool_client(pool_address) as client:
        assert PoolTransfer(client, src, "fp-test").store(KEYS, [0, 1, 2]) == 3
        assert PoolTransfer(client, dst, "fp-test").load(KEYS, [5, 6, 7]) == 3
    for s, d in ((0, 5), (1, 6), (2, 7)):
        assert torch.equal(src.read_block(s), dst.read_block(d))


def test_corrupt_object_ends_the_prefix(pool_address: str) -> None:
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(100, 148)), tenant="t")
    src, dst = _cache(3), _cache(4)
    with pool_client(pool_address) as client:
        client.put_many([(keys[1], b"\x00" * 4096)])  # someone else's bytes under block 1
        PoolTransfer(client, src, "fp-test").store(keys, [0, 1, 2])
        before = dst.read_block(4).clone()
        assert PoolTransfer(client, dst, "fp-test").load(keys, [3, 4, 5]) == 1
    assert torch.equal(dst.read_block(3), src.read_block(0))
    assert torch.equal(dst.read_block(4), before)  # untouched: the engine computes it


def test_other_layout_fingerprint_is_a_miss(pool_address: str) -> None:
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(200, 232)), tenant="t")
    with pool_client(pool_address) as client:
        PoolTransfer(client, _cache(5), "fp-test").store(keys, [0, 1])
        assert PoolTransfer(client, _cache(6), "fp-other").load(keys, [0, 1]) == 0


def test_unreachable_pool_is_a_miss_not_an_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = KVStoreClient(dead, host_id="host-a", config=ClientConfig(rpc_timeout_s=2.0))
    try:
        xfer = PoolTransfer(client, _cache(7), "fp-test")
        assert xfer.load(KEYS, [0, 1, 2]) == 0
        assert xfer.store(KEYS, [0, 1, 2]) == 0
    finally:
        client.close()
