"""Reads straight into caller-owned buffers (KVStoreClient.read_into) on every transport, with
real master and node servers on loopback."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from kv_helpers import raw_size

from kvstore import hashed_copy
from kvstore.block_object import BlockLayout, Rejection, header_size
from kvstore.client import KVStoreClient
from kvstore.node_service import NodeServer
from kvstore.reader import CallerBufferError
from kvstore.transports import TransportError
from kvstore.transports.tcp import TcpTransport

# (client host, client config): how a client reaches a node on host-a through each transport.
TRANSPORTS = {
    "shm": ("host-a", {}),
    "tcp": ("host-b", {}),
    "grpc": ("host-b", {"enable_tcp": False}),
}
SIZES = (10_000, 65_536, 1)
# Every transport, and shm once more with numpy's copy and Python's hashing in place of the
# hashed C copy (what runs where no compiler builds it).
COPIES = [*TRANSPORTS, "shm:numpy"]


def block_key(i: int) -> str:
    return f"{i:032x}"


def payload(i: int, n: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(n))


def make_client(client_factory: Callable[..., KVStoreClient], transport: str,
                monkeypatch: pytest.MonkeyPatch | None = None) -> KVStoreClient:
    """A client that reads through `transport` ("shm:numpy": shm without the hashed copy)."""
    name, _, copy = transport.partition(":")
    if copy == "numpy":
        assert monkeypatch is not None
        monkeypatch.setattr(hashed_copy, "available", lambda: False)
    host, cfg = TRANSPORTS[name]
    return client_factory(host_id=host, **cfg)


@pytest.mark.parametrize("transport", COPIES)
def test_read_into_a_match_lands_exact_bytes_in_the_callers_buffers(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    node = node_factory("n")
    c = make_client(client_factory, transport, monkeypatch)
    keys = [block_key(i) for i in range(len(SIZES))]
    data = [payload(i, n) for i, n in enumerate(SIZES)]
    assert c.put_many(list(zip(keys, data, strict=True))) == [True] * 3
    m = c.match_prefix(keys)
    assert m.matched == 3
    assert c.transport_name(m.nodes[0]) == transport.partition(":")[0]
    assert m.nodes[0].node_id == node.node.config.node_id
    buffers = [bytearray(n) for n in SIZES]
    got = c.read_into(m, buffers)
    assert [bytes(b) for b in buffers] == data
    assert got.rejected == (None, None, None)
    assert got.nbytes == sum(raw_size(n, k) for n, k in zip(SIZES, keys, strict=True))
    for obj, buf, key in zip(got.objects, buffers, keys, strict=True):
        assert obj is not None and obj.key == key
        # The payload handed back is the caller's own buffer, not a copy of it.
        assert isinstance(obj.payload, memoryview) and obj.payload.obj is buf


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_read_into_by_keys_with_a_layout_fills_a_numpy_array(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        transport: str) -> None:
    node_factory("n")
    c = make_client(client_factory, transport)
    layout = BlockLayout("fp-test", "float32", (4, 8))
    block = np.arange(32, dtype=np.float32).reshape(4, 8)
    assert c.put_many([(block_key(1), block.data)], layout) == [True]
    out = np.zeros((4, 8), np.float32)
    spare = np.full((4, 8), -1.0, np.float32)
    got = c.read_into([block_key(1), block_key(2)], [out, spare], layout)
    assert np.array_equal(out, block)
    assert got.objects[0] is not None and got.objects[0].layout == layout
    assert got.objects[1] is None and got.rejected[1] is None  # never stored: a plain miss
    assert (spare == -1.0).all()  # a miss's buffer is not touched when nothing was read
    # Same sizes, another producer's layout: read, and refused after it lands.
    other = BlockLayout("fp-tesX", "float32", (4, 8))
    got = c.read_into([block_key(1)], [np.zeros((4, 8), np.float32)], other)
    assert got.objects == (None,) and got.rejected == (Rejection.LAYOUT,)


# 600,000 bytes: two objects pass OVERLAP_CHECK_BYTES, so each is checked as it lands.
@pytest.mark.parametrize("size", [4096, 600_000])
@pytest.mark.parametrize("transport", COPIES)
def test_a_corrupted_object_read_into_a_buffer_is_a_miss(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        transport: str, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    node = node_factory("n")
    c = make_client(client_factory, transport, monkeypatch)
    keys = [block_key(i) for i in range(2)]
    assert c.put_many([(k, payload(i, size)) for i, k in enumerate(keys)]) == [True, True]
    m = c.match_prefix(keys)
    loc = m.locations[1]
    at = loc.offset + header_size(keys[1], BlockLayout.raw(size)) + 100
    node.node.segment.view[at] ^= 0xFF
    buffers = [bytearray(size), bytearray(size)]
    got = c.read_into(m, buffers)
    assert bytes(buffers[0]) == payload(0, size)
    assert got.objects[0] is not None
    assert got.objects[1] is None and got.rejected[1] is Rejection.CHECKSUM
    assert c.metrics.registry.get_sample_value(
        "pantry_kv_client_objects_rejected_total", {"reason": "checksum"}) == 1.0


def test_buffers_that_cannot_take_their_object_are_refused_before_any_read(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    node_factory("n")
    c = client_factory(host_id="host-b")
    keys = [block_key(i) for i in range(2)]
    assert c.put_many([(k, payload(i, 10_000)) for i, k in enumerate(keys)]) == [True, True]
    m = c.match_prefix(keys)
    head = header_size(keys[1], BlockLayout.raw(10_000))
    first = bytearray(10_000)
    with pytest.raises(ValueError, match=rf"buffers\[1\] is 9999 bytes; the object of {keys[1]} "
                                         rf"holds 10000 bytes of payload \({10_000 + head} with"):
        c.read_into(m, [first, bytearray(9_999)])
    assert first == bytearray(10_000)  # nothing was read
    with pytest.raises(CallerBufferError, match=r"buffers\[0\] is 10001 bytes; .* holds 10000"):
        c.read_into(m, [bytearray(10_001)])
    with pytest.raises(CallerBufferError, match=r"buffers\[1\] is read-only"):
        c.read_into(m, [first, bytes(10_000)])
    with pytest.raises(CallerBufferError, match=r"3 buffers for 2 objects"):
        c.read_into(m, [first, bytearray(10_000), bytearray(10_000)])
    with pytest.raises(CallerBufferError, match=r"3 buffers for 2 keys"):
        c.read_into(keys, [first, bytearray(10_000), bytearray(10_000)])
    with pytest.raises(CallerBufferError, match=r"buffers\[0\] is not contiguous"):
        c.read_into(m, [np.zeros((100, 200), np.uint8)[:, ::2]])
    # Fewer buffers than matched keys: only the leading objects are read.
    got = c.read_into(m, [first])
    assert bytes(first) == payload(0, 10_000) and len(got.objects) == 1


def test_reads_from_two_nodes_land_in_one_call(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    node_factory("a")
    c = client_factory(host_id="host-b")
    keys = [block_key(i) for i in range(6)]
    data = [payload(i, 50_000) for i in range(6)]
    assert c.put_many(list(zip(keys[:3], data[:3], strict=True))) == [True] * 3
    node_factory("b")  # empty: the next objects go to it
    assert c.put_many(list(zip(keys[3:], data[3:], strict=True))) == [True] * 3
    m = c.match_prefix(keys)
    assert len({loc.node_id for loc in m.locations}) == 2
    buffers = [bytearray(50_000) for _ in keys]
    got = c.read_into(m, buffers)
    assert [bytes(b) for b in buffers] == data
    assert all(o is not None for o in got.objects)


def test_tcp_read_into_of_another_epoch_is_refused(
        node_factory: Callable[..., NodeServer]) -> None:
    node = node_factory("n")
    segment = node.node.segment
    segment.write(0, b"0123456789")
    stale = TcpTransport(node.node.tcp_address, 5.0, epoch=node.node.epoch + 1)
    with pytest.raises(TransportError, match="epoch"):
        stale.read_into([(0, [memoryview(bytearray(4))])])
    stale.close()
    t = TcpTransport(node.node.tcp_address, 5.0, epoch=node.node.epoch)
    a, b = memoryview(bytearray(3)), memoryview(bytearray(5))
    t.read_into([(2, [a, b]), (0, [memoryview(bytearray(0))])])
    assert (bytes(a), bytes(b)) == (b"234", b"56789")
    t.close()


def test_thousands_of_small_objects_cross_tcp_in_gathered_sends(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    # 1,500 objects of two parts each: more buffers than one sendmsg takes (1,024).
    node_factory("n", dram_bytes=16 * 1024 * 1024)
    c = client_factory(host_id="host-b")
    keys = [block_key(i) for i in range(1500)]
    data = [payload(i, 100) for i in range(1500)]
    assert c.put_many(list(zip(keys, data, strict=True))) == [True] * 1500
    m = c.match_prefix(keys)
    assert m.matched == 1500 and c.transport_name(m.nodes[0]) == "tcp"
    buffers = [bytearray(100) for _ in keys]
    got = c.read_into(m, buffers)
    assert [bytes(b) for b in buffers] == data
    assert got.rejected == (None,) * 1500
