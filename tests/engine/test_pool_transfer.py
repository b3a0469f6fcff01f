"""Blocks between a paged cache and a real pool: exact round trip, and every kind of bad or
missing object is a miss (the engine computes it), never wrong KV and never an exception; the
pool-client metrics count every block and byte of it."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from engine.engine_metrics import PoolClientMetrics
from engine.kv_cache import PagedKVCache
from engine.pool_transfer import PoolTransfer
from kvstore.block_object import RAW_DTYPE, RAW_FINGERPRINT, BlockLayout, encoded_size
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from kvstore.hashing import PoolAddressing
from kvstore.prefix_match import PrefixMatch
from kvstore.reader import Fetched
from pantry.common.config_flags import MIB
from tests.decode.engine_rig import pool_client, running_pool


def _cache(seed: int) -> PagedKVCache:
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2,
                         head_dim=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


KEYS = PoolAddressing("fp-test", 16).block_keys(list(range(48)), tenant="t")
# One block of _cache(): 2 layers x (k, v) x 16 tokens x 2 heads x 8 dims of float32.
PAYLOAD_BYTES = 2 * 2 * 16 * 2 * 8 * 4
OBJECT_BYTES = encoded_size("fp-test", "float32", (2, 2, 16, 2, 8), PAYLOAD_BYTES)
LABELS = {"role": "test", "engine_id": "xfer-0"}


class Xfer:
    """A PoolTransfer with metrics of its own, and their values by short name."""

    def __init__(self, client: KVStoreClient, cache: PagedKVCache, fingerprint: str) -> None:
        self.registry = CollectorRegistry()
        metrics = PoolClientMetrics(self.registry, LABELS["role"], LABELS["engine_id"])
        self.transfer = PoolTransfer(client, cache, fingerprint, metrics)

    def value(self, name: str) -> float | None:
        return self.registry.get_sample_value(f"pantry_pool_client_{name}", LABELS)

    def blocks(self) -> tuple[float | None, ...]:
        """(hit, missed, rejected, stored)."""
        return tuple(self.value(f"blocks_{kind}_total")
                     for kind in ("hit", "missed", "rejected", "stored"))

    def io(self) -> tuple[float | None, ...]:
        """(reads, bytes read, writes, bytes written)."""
        return (self.value("read_seconds_count"), self.value("read_bytes_total"),
                self.value("write_seconds_count"), self.value("written_bytes_total"))


@pytest.fixture(scope="module")
def pool_address() -> str:  # type: ignore[misc]
    with running_pool("xfer") as address:
        yield address


def test_round_trip_is_exact(pool_address: str) -> None:
    src, dst = _cache(1), _cache(2)
    with pool_client(pool_address) as client:
        writer, reader = Xfer(client, src, "fp-test"), Xfer(client, dst, "fp-test")
        assert writer.transfer.store(KEYS, [0, 1, 2]) == 3
        assert reader.transfer.load(KEYS, [5, 6, 7]) == 3
    for s, d in ((0, 5), (1, 6), (2, 7)):
        assert torch.equal(src.read_block(s), dst.read_block(d))
    assert writer.blocks() == (0, 0, 0, 3)
    assert writer.io() == (0, 0, 1, 3 * OBJECT_BYTES)
    assert reader.blocks() == (3, 0, 0, 0)
    assert reader.io() == (1, 3 * OBJECT_BYTES, 0, 0)


def test_nothing_asked_for_is_no_pool_call(pool_address: str) -> None:
    with pool_client(pool_address) as client:
        xfer = Xfer(client, _cache(1), "fp-test")
        assert xfer.transfer.load([], [0]) == 0
        assert xfer.transfer.store([], []) == 0
    assert xfer.blocks() == (0, 0, 0, 0)
    assert xfer.io() == (0, 0, 0, 0)


def test_corrupt_object_ends_the_prefix(pool_address: str) -> None:
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(100, 148)), tenant="t")
    src, dst = _cache(3), _cache(4)
    with pool_client(pool_address) as client:
        client.put_many([(keys[1], b"\x00" * 4096)])  # plain bytes, not a block, under block 1
        Xfer(client, src, "fp-test").transfer.store(keys, [0, 1, 2])
        reader = Xfer(client, dst, "fp-test")
        assert reader.transfer.load(keys, [3, 4, 5]) == 1
    assert torch.equal(dst.read_block(3), src.read_block(0))
    # Blocks 4 and 5 are not loaded: the engine computes them. A pull lands straight in the
    # (fresh) blocks, so what they hold until then is unspecified.
    # All three objects were fetched; the second failed its checks, so the third goes unused.
    assert reader.blocks() == (1, 1, 1, 0)
    raw_bytes = encoded_size(RAW_FINGERPRINT, RAW_DTYPE, (4096,), 4096)
    assert reader.io() == (1, 2 * OBJECT_BYTES + raw_bytes, 0, 0)


def test_other_layout_fingerprint_is_a_miss(pool_address: str) -> None:
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(200, 232)), tenant="t")
    with pool_client(pool_address) as client:
        Xfer(client, _cache(5), "fp-test").transfer.store(keys, [0, 1])
        reader = Xfer(client, _cache(6), "fp-other")
        assert reader.transfer.load(keys, [0, 1]) == 0
    assert reader.blocks() == (0, 1, 1, 0)
    assert reader.io() == (1, 2 * OBJECT_BYTES, 0, 0)


def test_absent_blocks_are_misses(pool_address: str) -> None:
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(300, 348)), tenant="t")
    with pool_client(pool_address) as client:
        Xfer(client, _cache(8), "fp-test").transfer.store(keys[:1], [0])
        reader = Xfer(client, _cache(9), "fp-test")
        assert reader.transfer.load(keys, [0, 1, 2]) == 1
    assert reader.blocks() == (1, 2, 0, 0)
    assert reader.io() == (1, OBJECT_BYTES, 0, 0)


def test_unreachable_pool_is_a_miss_not_an_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = KVStoreClient(dead, host_id="host-a", config=ClientConfig(rpc_timeout_s=2.0))
    try:
        xfer = Xfer(client, _cache(7), "fp-test")
        assert xfer.transfer.load(KEYS, [0, 1, 2]) == 0
        assert xfer.transfer.store(KEYS, [0, 1, 2]) == 0
    finally:
        client.close()
    # Both calls were tried (and timed); nothing moved.
    assert xfer.blocks() == (0, 3, 0, 0)
    assert xfer.io() == (1, 0, 1, 0)


class RecordingClient(KVStoreClient):
    """The real client, noting where `read_into` was asked to land each payload, and whether
    the copying `read` was used."""

    def __init__(self, address: str) -> None:
        super().__init__(address, host_id="host-a",
                         config=ClientConfig(max_object_bytes=4 * MIB, rpc_timeout_s=5.0))
        self.landed: list[int] = []
        self.copying_reads = 0

    def read_into(self, target: PrefixMatch | Sequence[str], buffers: Sequence[object],
                  layout: BlockLayout | None = None) -> Fetched:
        self.landed += [np.frombuffer(b, dtype=np.uint8).ctypes.data  # type: ignore[call-overload]
                        for b in buffers]
        return super().read_into(target, buffers, layout)

    def read(self, match: PrefixMatch, layout: BlockLayout | None = None) -> Fetched:
        self.copying_reads += 1
        return super().read(match, layout)


def test_pull_lands_straight_in_the_cache_blocks(pool_address: str) -> None:
    """Over shm (same host) the payload's one copy is out of the segment into the block."""
    keys = PoolAddressing("fp-test", 16).block_keys(list(range(400, 448)), tenant="t")
    src, dst = _cache(11), _cache(12)
    with pool_client(pool_address) as client:
        assert Xfer(client, src, "fp-test").transfer.store(keys, [0, 1, 2]) == 3
    client = RecordingClient(pool_address)
    with client:
        reader = Xfer(client, dst, "fp-test")
        assert reader.transfer.load(keys, [6, 2, 4]) == 3
        assert client.transport_name(next(iter(client.status().nodes)).node) == "shm"
    assert client.landed == [dst.block_view(b).data_ptr() for b in (6, 2, 4)]
    assert client.copying_reads == 0
    for s, d in ((0, 6), (1, 2), (2, 4)):
        assert torch.equal(dst.read_block(d), src.read_block(s))
    assert reader.blocks() == (3, 0, 0, 0)
    assert reader.io() == (1, 3 * OBJECT_BYTES, 0, 0)
