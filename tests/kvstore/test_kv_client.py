"""Client against real in-process master and node gRPC servers, over shm and grpc transports."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest
from kv_helpers import wait_for

from kvstore.block_object import BlockLayout, Rejection, encoded_size
from kvstore.client import KVStoreClient, PrefixMatch
from kvstore.errors import ObjectTooLargeError
from kvstore.hashing import BlockHasher, make_namespace
from kvstore.node_service import NodeServer
from pantry.common.config_flags import MIB
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

NodeFactory = Callable[..., NodeServer]
ClientFactory = Callable[..., KVStoreClient]


LAYOUT = BlockLayout("fp", "uint8", (3000,))
OBJECT_BYTES = encoded_size("fp", "uint8", (3000,), 3000)


def blocks(n: int, size: int = 3000, fp: str = "fp") -> list[tuple[str, bytes]]:
    keys = BlockHasher(make_namespace(fp), block_size=4).block_keys(list(range(4 * n)))
    return [(k, os.urandom(size)) for k in keys]


@pytest.mark.parametrize(("client_host", "enable_tcp", "transport"),
                         [("host-a", True, "shm"), ("host-b", True, "tcp"),
                          ("host-b", False, "grpc")])
def test_put_get_match_exists_remove(
    node_factory: NodeFactory, client_factory: ClientFactory, client_host: str, enable_tcp: bool,
    transport: str
) -> None:
    node = node_factory("n")
    c = client_factory(host_id=client_host, enable_tcp=enable_tcp)
    items = blocks(4)
    keys = [k for k, _ in items]
    assert c.put_many(items[:3], LAYOUT) == [True] * 3
    (node_info,) = c.status().nodes
    assert c.transport_name(node_info.node) == transport
    assert c.get_many(keys) == [items[0][1], items[1][1], items[2][1], None]
    assert c.get_many(keys, LAYOUT) == [items[0][1], items[1][1], items[2][1], None]
    assert c.exists(keys) == [True, True, True, False]
    m = c.match_prefix(keys)
    assert isinstance(m, PrefixMatch) and m.matched == 3
    assert [loc.key for loc in m.locations] == keys[:3]
    assert all(loc.node_id == node.node.config.node_id for loc in m.locations)
    assert [loc.length for loc in m.locations] == [OBJECT_BYTES] * 3
    assert c.match_prefix([keys[1], keys[0]]).matched == 2
    assert c.match_prefix(["00" * 16, keys[0]]).matched == 0
    assert c.remove([keys[1], "missing"]) == 1
    assert c.match_prefix(keys).matched == 1
    assert c.get_many([keys[1]]) == [None]
    assert c.get_many([]) == [] and c.put_many([]) == []
    (obj,) = c.get_objects([keys[0]], LAYOUT).objects
    assert obj is not None and obj.key == keys[0] and obj.layout == LAYOUT
    assert bytes(obj.payload) == items[0][1]
    # Another layout than the one written is refused, not returned.
    other = BlockLayout("fp", "uint8", (2999,))
    fetched = c.get_objects([keys[0]], other)
    assert (fetched.objects, fetched.rejected, fetched.nbytes) == ((None,), (Rejection.LAYOUT,),
                                                                   OBJECT_BYTES)


def test_shm_and_grpc_clients_see_the_same_bytes(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("n")
    local, remote = client_factory(host_id="host-a"), client_factory(host_id="host-b")
    a, b = blocks(2)
    assert local.put_many([a]) == [True]
    assert remote.put_many([b]) == [True]
    assert remote.get_many([a[0], b[0]]) == [a[1], b[1]]
    assert local.get_many([a[0], b[0]]) == [a[1], b[1]]


def test_duplicate_put_and_unsealed_invisible(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node_factory("n")
    c = client_factory()
    (k, v), = blocks(1)
    assert c.put_many([(k, v), (k, v)]) == [True, True]
    assert c.put_many([(k, b"other bytes")]) == [True]  # exists: first writer wins
    assert c.get_many([k]) == [v]
    # A raw two-phase put left open is invisible to every reader.
    with grpc.insecure_channel(master_address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        r = stub.PutStart(pb.PutStartRequest(keys=["pending"], sizes=[10],
                                             client_host_id="x"))
        assert r.slots[0].state == pb.PUT_STATE_ALLOCATED
        assert c.exists(["pending"]) == [False]
        assert c.get_many(["pending"]) == [None]
        assert c.match_prefix(["pending"]).matched == 0
        assert c.put_many([("pending", b"y" * 10)]) == [False]  # in progress elsewhere
        token = r.slots[0].grant.token
        assert stub.PutEnd(pb.PutFinishRequest(
            puts=[pb.PutTicket(key="pending", token=token + 1)])).sealed == [False]
        assert stub.PutEnd(pb.PutFinishRequest(
            puts=[pb.PutTicket(key="pending", token=token)])).sealed == [True]
        assert c.exists(["pending"]) == [True]


def test_object_too_large_is_a_clear_error(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("n")
    c = client_factory()
    with pytest.raises(ObjectTooLargeError, match="max_object_bytes"):
        c.put_many([("ok", b"x"), ("big", b"x" * (4 * MIB + 1))])
    assert c.exists(["ok", "big"]) == [False, False]  # nothing half-done


def test_full_pool_returns_false_not_raise(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("n", dram_bytes=1 * MIB)
    c = client_factory(host_id="host-b")
    big = [(f"b{i}", os.urandom(600 * 1024)) for i in range(2)]
    assert c.put_many(big[:1]) == [True]
    c.get_many(["b0"])  # leased: cannot be evicted to make room
    assert c.put_many(big[1:]) == [False]
    assert c.get_many(["b0"]) == [big[0][1]]


@pytest.mark.slow
def test_node_death_is_a_miss_not_wrong_data(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node = node_factory("n")
    c = client_factory(host_id="host-b")  # grpc: the node process being gone is visible
    items = blocks(3)
    assert c.put_many(items) == [True] * 3
    node.stop(grace=0)
    got = c.get_many([k for k, _ in items])
    assert all(g is None or g == v for g, (_, v) in zip(got, items, strict=True))
    assert not os.path.exists(node.node.segment.path)
    # After the heartbeat timeout the master forgets the node and its objects.
    wait_for(lambda: c.status().nodes == (), timeout=5, what="node dropped")
    assert c.get_many([k for k, _ in items]) == [None] * 3
    assert c.match_prefix([k for k, _ in items]).matched == 0


def test_concurrent_threads(node_factory: NodeFactory, client_factory: ClientFactory) -> None:
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory()
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            items = [(f"t{t}-{i}", os.urandom(5000)) for i in range(20)]
            assert c.put_many(items) == [True] * 20
            assert c.get_many([k for k, _ in items]) == [v for _, v in items]
        except BaseException as e:  # surfaced below; a thread's assert is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert c.status().objects == 160


def test_two_nodes_and_status(node_factory: NodeFactory, client_factory: ClientFactory) -> None:
    node_factory("n1", host_id="host-a")
    node_factory("n2", host_id="host-b")
    c = client_factory(host_id="host-b")
    items = blocks(5)
    assert c.put_many(items) == [True] * 5
    s = c.status()
    assert len(s.nodes) == 2 and s.objects == 5 and s.puts == 5
    by_id = {n.node.host_id: n.objects for n in s.nodes}
    assert by_id == {"host-a": 0, "host-b": 5}  # the writer's own host is preferred
    assert c.get_many([k for k, _ in items]) == [v for _, v in items]
    assert s.capacity_bytes == 16 * MIB


def test_health_and_node_edge_limits(node_factory: NodeFactory, master_address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    node = node_factory("n")
    for addr, svc in ((master_address, "pantry.v1.KVMaster"), (node.address, "pantry.v1.KVNode")):
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=svc))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    big = 64 * 1024 * 1024
    opts = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    with grpc.insecure_channel(node.address, options=opts) as ch:
        stub = pb_grpc.KVNodeStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Write(pb.WriteRequest(ops=[pb.WriteOp(data=b"x" * (4 * MIB + 1))]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_object_bytes" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.Read(pb.ReadRequest(ops=[pb.ReadOp(offset=8 * MIB - 1, length=2)],
                                     epoch=node.node.epoch))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_overwritten_slot_is_a_counted_miss(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node = node_factory("n")
    c = client_factory()
    (k, v), = blocks(1)
    assert c.put_many([(k, v)], LAYOUT) == [True]
    (loc,) = c.match_prefix([k]).locations
    # Simulate a reader racing a slot reuse (lease ran out): other bytes land in the slot.
    node.node.segment.write(loc.offset + loc.length - 10, b"\xff" * 10)
    assert c.get_many([k]) == [None]
    assert c.metrics.registry.get_sample_value("pantry_kv_client_objects_rejected_total",
                                               {"reason": "checksum"}) == 1


def test_tcp_transport_errors_keep_the_stream_framed(node_factory: NodeFactory,
                                                     master_address: str) -> None:
    from kvstore.transports import TransportError
    from kvstore.transports.tcp import TcpTransport
    from kvstore.wire import grant_from_proto

    node = node_factory("n")
    assert node.node.tcp_address
    t = TcpTransport(node.node.tcp_address, timeout_s=5, epoch=node.node.epoch)
    with grpc.insecure_channel(master_address) as ch:
        r = pb_grpc.KVMasterStub(ch).PutStart(
            pb.PutStartRequest(keys=["a", "b"], sizes=[3, 5000], client_host_id="x"))
    a, b = (grant_from_proto(s.grant) for s in r.slots)
    # b's size class (5,056-byte slots) opens its slab page after a's 1 MiB page of 4 KiB.
    assert (a.offset, b.offset) == (0, 1 * MIB)
    try:
        t.write([(a, b"abc"), (b, b"\x01" * 5000)])
        with pytest.raises(TransportError, match="max_object_bytes"):
            t.write([(replace(a, length=4 * MIB + 1), b"x" * (4 * MIB + 1))])
        with pytest.raises(TransportError, match="outside segment"):
            t.read([(8 * MIB - 1, 2)])
        # The same pooled connection still speaks the protocol after both refusals.
        assert t.read([(0, 3), (1 * MIB, 5000)]) == [b"abc", b"\x01" * 5000]
        assert node.node.segment.read(0, 3) == b"abc"
    finally:
        t.close()


def test_tcp_pipelines_a_calls_batches_and_a_refusal_midway_is_an_error(
        node_factory: NodeFactory, master_address: str) -> None:
    from kvstore.transports import TransportError
    from kvstore.transports.tcp import TcpTransport
    from kvstore.wire import grant_from_proto

    node = node_factory("n")
    # Batches of at most 4 KiB: each op below is a request of its own, all sent before the
    # first answer is read.
    t = TcpTransport(node.node.tcp_address, timeout_s=5, epoch=node.node.epoch,
                     batch_bytes=4096)
    with grpc.insecure_channel(master_address) as ch:
        r = pb_grpc.KVMasterStub(ch).PutStart(
            pb.PutStartRequest(keys=["a", "b", "c"], sizes=[3000, 3000, 3000],
                               client_host_id="x"))
    a, b, c = (grant_from_proto(s.grant) for s in r.slots)
    data = [os.urandom(3000) for _ in range(3)]
    try:
        t.write([(a, data[0]), (b, data[1]), (c, data[2])])
        bufs = [bytearray(3000) for _ in range(3)]
        t.read_into([(g.offset, [memoryview(buf)]) for g, buf in zip((a, b, c), bufs,
                                                                       strict=True)])
        assert [bytes(x) for x in bufs] == data
        assert t.read([(g.offset, 3000) for g in (c, a)]) == [data[2], data[0]]
        # The second of three requests is refused (a forged grant): the call fails, the
        # first request's bytes landed, and the next call works on a fresh connection.
        forged = replace(b, mac=b"\0" * 16)
        with pytest.raises(TransportError, match="write grant is not valid"):
            t.write([(a, b"\x07" * 3000), (forged, b"\x08" * 3000), (c, b"\x09" * 3000)])
        assert t.read([(a.offset, 3000), (b.offset, 3000)]) == [b"\x07" * 3000, data[1]]
        assert node.node.segment.read(b.offset, 3000) == data[1]
    finally:
        t.close()


def test_a_put_whose_header_cannot_hold_its_layout_gives_its_slots_back(
        node_factory: NodeFactory, client_factory: ClientFactory) -> None:
    node_factory("n")
    c = client_factory("host-b")
    # The master allocates while the client hashes; the header then refuses the layout.
    with pytest.raises(ValueError, match="shorter than 65536"):
        c.put_many([("k", b"x" * 3000)], layout=BlockLayout("f" * 70_000, "uint8", (3000,)))
    # The allocation was aborted at once: the key is not busy, and the slot is free again.
    assert c.status().nodes[0].used_bytes == 0
    assert c.put_many([("k", b"y" * 3000)], layout=LAYOUT) == [True]
    assert c.get_many(["k"]) == [b"y" * 3000]
