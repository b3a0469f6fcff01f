"""The writer's parts: a large put is allocated in two parts (its first batch alone, so its
bytes go out while the master allocates the rest), written, and sealed with one call once
all are written, over a real master and node; a put the master refuses gives back every part
it allocated."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.errors import ObjectTooLargeError
from kvstore.master_service import MasterServer
from kvstore.node_service import NodeServer
from kvstore.writer import _allocation_parts
from pantry.common.config_flags import MIB
from pantry.v1 import kvstore_pb2 as pb

ClientFactory = Callable[..., KVStoreClient]
NodeFactory = Callable[..., NodeServer]


@pytest.fixture
def master_config() -> MasterConfig:
    # The master takes objects of at most 1 MiB; the clients here, 4 MiB.
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.1, lease_ms=500,
                        max_object_bytes=MIB)


def test_a_put_is_allocated_as_its_first_batch_then_the_rest() -> None:
    assert _allocation_parts([10] * 40, 0) == [(0, 40)]  # small puts: one part
    assert _allocation_parts([10] * 40, 30) == [(0, 3), (3, 40)]
    assert _allocation_parts([50, 10, 10], 30) == [(0, 1), (1, 3)]  # a large first object alone
    assert _allocation_parts([10, 10], 30) == [(0, 2)]  # it all fits the first batch
    assert _allocation_parts([10], 30) == [(0, 1)]


class _Calls:
    """The keys of each PutStart and PutEnd a writer sends, in order (the calls go on to the
    real master)."""

    def __init__(self, stub: Any) -> None:
        self.starts: list[list[str]] = []
        self.ends: list[list[str]] = []
        put_start, put_end = stub.PutStart, stub.PutEnd

        def start(req: pb.PutStartRequest, **kw: Any) -> pb.PutStartResponse:
            self.starts.append(list(req.keys))
            return put_start(req, **kw)

        def end(req: pb.PutFinishRequest, **kw: Any) -> pb.PutEndResponse:
            self.ends.append([t.key for t in req.puts])
            return put_end(req, **kw)

        stub.PutStart, stub.PutEnd = start, end


@pytest.mark.parametrize("host", ["host-a", "host-b"], ids=["shm", "tcp"])
def test_a_large_put_is_allocated_written_and_sealed_in_parts(
        master: MasterServer, node_factory: NodeFactory, client_factory: ClientFactory,
        host: str) -> None:
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory(host_id=host, batch_bytes=MIB)
    calls = _Calls(c._writer._master)
    size = 250_000
    items = [(f"{i:032x}", os.urandom(size)) for i in range(20)]
    assert c.put_many(items) == [True] * 20
    # 4 objects fit 1 MiB: the first 4, then the other 16; all sealed at once, once written.
    keys = [k for k, _ in items]
    assert calls.starts == [keys[0:4], keys[4:20]]
    assert calls.ends == [keys]
    s = c.status()
    assert (s.objects, s.puts) == (20, 20)
    buffers = [bytearray(size) for _ in items]
    got = c.read_into(keys, buffers)
    assert got.rejected == (None,) * 20
    assert [bytes(b) for b in buffers] == [d for _, d in items]


def test_a_put_the_master_refuses_gives_back_every_part(
        master: MasterServer, node_factory: NodeFactory,
        client_factory: ClientFactory) -> None:
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory(host_id="host-b", batch_bytes=MIB)
    # The last object is larger than the master takes (1 MiB), not than the client does.
    items = [(f"{i:032x}", os.urandom(300_000)) for i in range(12)] + [
        ("big", os.urandom(2 * MIB))]
    with pytest.raises(ObjectTooLargeError, match="max_object_bytes 1048576"):
        c.put_many(items)
    s = c.status()
    assert (s.objects, s.used_bytes, s.puts) == (0, 0, 0)
    # Every part allocated (how many were before the refusal is the master's timing) was
    # given back at once; the parts not allocated yet never were.
    assert 0 < master.master.puts_started == master.master.puts_aborted <= 12
    assert c.put_many(items[:12]) == [True] * 12
