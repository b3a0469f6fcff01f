"""Puts over the bulk TCP transport: requests split to the node's limits (learned with the
handshake), and payloads hashed in another thread while earlier objects are on the wire."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
import xxhash

from kvstore.block_object import (
    BlockLayout,
    BlockObject,
    PendingObject,
    check_object,
    encode_parts,
)
from kvstore.client import KVStoreClient
from kvstore.config import NodeConfig
from kvstore.errors import ObjectTooLargeError
from kvstore.node_service import NodeServer, start_node
from kvstore.transports import TransportError, parts_of
from kvstore.transports.tcp import TcpTransport
from kvstore.writer import HASH_BEHIND_BYTES
from pantry.common.config_flags import MIB

ClientFactory = Callable[..., KVStoreClient]
NodeFactory = Callable[..., NodeServer]


@pytest.fixture
def small_node(master_address: str) -> Iterator[NodeServer]:
    """A node that takes at most 4 ops, 1 MiB objects and 1 MiB per request: far below what
    a client batches by default (16 MiB)."""
    from kv_helpers import wait_registered

    srv = start_node(NodeConfig(master_address=master_address, node_id=f"small-{os.getpid()}",
                                dram_bytes=16 * MIB, host_id="host-a", heartbeat_s=0.2,
                                max_object_bytes=1 * MIB, max_request_bytes=1 * MIB,
                                max_ops_per_request=4))
    wait_registered(master_address, srv)
    yield srv
    srv.stop(grace=0)


def test_the_handshake_tells_a_client_the_nodes_limits(small_node: NodeServer) -> None:
    host, _, port = small_node.node.tcp_address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("<4sH", b"PKA1", 0) + struct.pack("<4sBxxxIQ", b"PKT2", 4, 0, 0))
        assert s.recv(16, socket.MSG_WAITALL) == struct.pack("<4sBxxxQ", b"PKT2", 0, 0)
        assert s.recv(16 + 24, socket.MSG_WAITALL) == (
            struct.pack("<4sBxxxQ", b"PKT2", 0, 24) + struct.pack("<QQQ", MIB, 4, MIB))


def test_a_put_larger_than_nodes_requests_is_split_not_reset(
        small_node: NodeServer, client_factory: ClientFactory) -> None:
    c = client_factory(host_id="host-b")
    # 3 objects of 400 KB: 1.2 MB in what the client batches as one request (before: the
    # node answered "max_request_bytes" and dropped the connection mid-send, a reset for the
    # client, and every object of the put failed), then 9 small ones: 9 ops in one request
    # (before: refused as a whole).
    large = [(f"{i:032x}", os.urandom(400_000)) for i in range(3)]
    small = [(f"{i + 3:032x}", os.urandom(3000)) for i in range(9)]
    for items in (large, small):
        assert c.put_many(items) == [True] * len(items)
        m = c.match_prefix([k for k, _ in items])
        assert m.matched == len(items) and c.transport_name(m.nodes[0]) == "tcp"
        buffers = [bytearray(len(d)) for _, d in items]
        got = c.read_into(m, buffers)
        assert [bytes(b) for b in buffers] == [d for _, d in items]
        assert got.rejected == (None,) * len(items)


def test_an_object_larger_than_the_node_takes_is_a_clear_error_on_a_live_connection(
        small_node: NodeServer, master_address: str) -> None:
    import grpc

    from kvstore.wire import grant_from_proto
    from pantry.v1 import kvstore_pb2 as pb
    from pantry.v1 import kvstore_pb2_grpc as pb_grpc

    with grpc.insecure_channel(master_address) as ch:
        r = pb_grpc.KVMasterStub(ch).PutStart(
            pb.PutStartRequest(keys=["big", "ok"], sizes=[MIB + 1, 3000], client_host_id="x"))
    big, ok = (grant_from_proto(s.grant) for s in r.slots)
    t = TcpTransport(small_node.node.tcp_address, 5.0, small_node.node.epoch)
    try:
        with pytest.raises(TransportError) as err:
            t.write([(ok, b"o" * 3000), (big, b"b" * (MIB + 1))])
        assert str(err.value) == (f"object of {MIB + 1} bytes exceeds node "
                                  f"{small_node.node.tcp_address}'s max_object_bytes {MIB}")
        assert small_node.node.segment.read(ok.offset, 3000) == b"\0" * 3000  # nothing sent
        t.write([(ok, b"o" * 3000)])  # the same pooled connection serves on
        assert t.read([(ok.offset, 3000)]) == [b"o" * 3000]
    finally:
        t.close()


def test_reads_are_split_to_the_nodes_limits_too(small_node: NodeServer) -> None:
    segment = small_node.node.segment
    segment.write(0, bytes(range(256)) * 4096)  # the first 1 MiB
    t = TcpTransport(small_node.node.tcp_address, 5.0, small_node.node.epoch)
    try:
        # 10 ops and 1.5 MiB in what batch_bytes (16 MiB) allows as one request.
        ops = [(i * 100_000, 150_000) for i in range(10)]
        want = [segment.read(o, n) for o, n in ops]
        assert t.read(ops) == want
        views = [memoryview(bytearray(n)) for _, n in ops]
        t.read_into([(o, [v]) for (o, _), v in zip(ops, views, strict=True)])
        assert [bytes(v) for v in views] == want
    finally:
        t.close()


def test_a_pending_object_is_the_encoded_object_once_hashed() -> None:
    payload = os.urandom(5000)
    layout = BlockLayout("fp", "float16", (2500,))
    pending = PendingObject("k", layout, payload)
    header, view = encode_parts("k", layout, payload)
    assert pending.nbytes == len(header) + 5000
    pending.compute_checksum()
    assert len(pending) == 2
    assert [bytes(p) for p in parts_of(pending)] == [header, payload]
    got = check_object(b"".join(parts_of(pending)), "k", layout)
    assert isinstance(got, BlockObject) and bytes(got.payload) == payload
    # The checksum field follows magic, version, four lengths, ndim, header and payload length.
    at = struct.calcsize("<4sHHHHHIQ")
    assert struct.unpack_from("<Q", pending.header(), at)[0] == xxhash.xxh3_64_intdigest(payload)


def test_a_pending_object_given_up_raises_instead_of_waiting() -> None:
    pending = PendingObject("k", BlockLayout.raw(10), b"0123456789")
    pending.give_up()
    with pytest.raises(RuntimeError, match="ended before this object's checksum"):
        pending.header()
    assert bytes(pending[1]) == b"0123456789"


def test_a_bad_layout_fails_before_anything_is_hashed_or_sent() -> None:
    with pytest.raises(ValueError, match="shape dimensions must be >= 0"):
        PendingObject("k", BlockLayout("fp", "uint8", (-1,)), b"x")


@pytest.mark.parametrize("batch_bytes", [16 * MIB, MIB // 2])
@pytest.mark.parametrize(("host", "cfg"), [("host-a", {}), ("host-b", {}),
                                           ("host-b", {"enable_tcp": False})],
                         ids=["shm", "tcp", "grpc"])
def test_puts_hashed_behind_the_writes_store_checked_objects(
        node_factory: NodeFactory, client_factory: ClientFactory, host: str,
        cfg: dict[str, object], batch_bytes: int) -> None:
    # Enough bytes that the hashing runs in another thread, ahead of the writes; with
    # batch_bytes of 512 KiB the put is allocated in two parts (its first object, then
    # the rest), and the key of its first object is named again in the second part.
    n = 6
    size = HASH_BEHIND_BYTES // 4
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory(host_id=host, batch_bytes=batch_bytes, **cfg)
    items = [(f"{i:032x}", os.urandom(size)) for i in range(n)]
    items.append(items[0])
    layout = BlockLayout("fp", "uint8", (size,))
    assert c.put_many(items, layout=layout) == [True] * (n + 1)
    buffers = [bytearray(size) for _ in range(n)]
    got = c.read_into([k for k, _ in items[:n]], buffers, layout=layout)
    assert [bytes(b) for b in buffers] == [d for _, d in items[:n]]
    assert got.rejected == (None,) * n
    assert c.status().nodes[0].objects == n  # the key named twice is stored once


def test_a_put_with_an_object_too_large_allocates_nothing(
        node_factory: NodeFactory, client_factory: ClientFactory) -> None:
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory(host_id="host-b", batch_bytes=MIB)  # max_object_bytes 4 MiB
    items = [(f"{i:032x}", os.urandom(700_000)) for i in range(3)] + [
        ("big", os.urandom(4 * MIB))]
    with pytest.raises(ObjectTooLargeError, match="max_object_bytes is 4194304"):
        c.put_many(items)
    assert c.status().nodes[0].used_bytes == 0
    assert c.put_many(items[:3]) == [True] * 3
