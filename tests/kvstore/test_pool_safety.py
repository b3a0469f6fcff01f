"""The issue-6 findings, each on a real master and node: no wrong KV, fenced writers, node
epochs, bounded eviction, limits. Every test here fails on the pool before the fix."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import grpc
import pytest
from kv_helpers import wait_for

from kvstore.block_object import BlockLayout, Rejection, encode_object
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.errors import InvalidKeyError
from kvstore.master_service import MasterServer, start_master
from kvstore.node_service import NodeServer, start_node
from kvstore.transports import TransportError
from kvstore.transports.shm import ShmTransport
from kvstore.transports.tcp import TcpTransport
from kvstore.wire import grant_from_proto
from pantry.common.config_flags import KIB, MIB
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

NodeFactory = Callable[..., NodeServer]
ClientFactory = Callable[..., KVStoreClient]


@pytest.fixture
def master_config() -> MasterConfig:
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.05, lease_ms=500,
                        put_timeout_s=0.3, max_object_bytes=4 * MIB, max_keys_per_request=64)


def rejected(c: KVStoreClient, reason: str) -> float | None:
    return c.metrics.registry.get_sample_value("pantry_kv_client_objects_rejected_total",
                                               {"reason": reason})


def raw(key: str, payload: bytes) -> bytes:
    return encode_object(key, BlockLayout.raw(len(payload)), payload)


def test_finding1_2_a_late_writer_in_a_reassigned_slot_is_caught(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node = node_factory("n")
    c = client_factory(host_id="host-a")  # shm: nothing but the object's header checks it
    late, b = os.urandom(1000), os.urandom(1000)
    with grpc.insecure_channel(master_address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        r = stub.PutStart(pb.PutStartRequest(keys=["a"], sizes=[len(raw("a", late))]))
        grant = grant_from_proto(r.slots[0].grant)
        # The writer stalls; its put is reclaimed and the slot goes to another key.
        wait_for(lambda: c.status().objects == 0, what="put of a reclaimed")
        assert c.put_many([("b", b)]) == [True]
        assert c.match_prefix(["b"]).locations[0].offset == grant.offset
        # Over TCP the node refuses the late write outright: the grant is void.
        tcp = TcpTransport(node.node.tcp_address, 5.0, node.node.epoch)
        with pytest.raises(TransportError, match="expired"):
            tcp.write([(grant, raw("a", late))])
        tcp.close()
        assert c.get_many(["b"]) == [b]
        # Through shared memory nothing stops it: its bytes land on b's object.
        shm = ShmTransport(node.node.segment.path, node.node.segment.size)
        shm.write([(grant, raw("a", late))])
        shm.close()
        ticket = pb.PutTicket(key="a", token=grant.token)
        assert stub.PutEnd(pb.PutFinishRequest(puts=[ticket])).sealed == [False]
    # A reader of b gets a miss, never a's bytes, and the refusal is counted.
    assert c.get_many(["b"]) == [None]
    assert rejected(c, "key") == 1
    assert c.exists(["a", "b"]) == [False, True]


def test_finding2_a_stale_writer_cannot_seal_another_writers_put(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node_factory("n")
    c = client_factory(host_id="host-b")
    with grpc.insecure_channel(master_address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        first = stub.PutStart(pb.PutStartRequest(keys=["k"], sizes=[100])).slots[0]
        wait_for(lambda: c.status().objects == 0, what="first put reclaimed")
        second = stub.PutStart(pb.PutStartRequest(keys=["k"], sizes=[100])).slots[0]
        assert second.state == pb.PUT_STATE_ALLOCATED
        stale = pb.PutTicket(key="k", token=first.grant.token)
        # Before: True, sealing an object the second writer had not written yet.
        assert stub.PutEnd(pb.PutFinishRequest(puts=[stale])).sealed == [False]
        assert stub.PutAbort(pb.PutFinishRequest(puts=[stale])).aborted == 0
        assert c.exists(["k"]) == [False]
        own = pb.PutTicket(key="k", token=second.grant.token)
        assert stub.PutAbort(pb.PutFinishRequest(puts=[own])).aborted == 1


def test_finding1_7_a_location_of_an_old_epoch_never_reads_a_new_object(
    node_factory: NodeFactory, client_factory: ClientFactory, master: MasterServer
) -> None:
    node = node_factory("n")
    local, remote = client_factory(host_id="host-a"), client_factory(host_id="host-b")
    x, y = os.urandom(3000), os.urandom(3000)
    assert local.put_many([("x", x)]) == [True]
    old_local, old_remote = local.match_prefix(["x"]), remote.match_prefix(["x"])
    epoch = node.node.epoch
    # A heartbeat blip: the master drops the node, which registers again under its id.
    master.master.register_node(replace(node.node.info(), epoch=0))
    wait_for(lambda: node.node.epoch not in (0, epoch)
             and remote.status().nodes[0].node.epoch == node.node.epoch,
             what="node registered again")
    # The node reported x, which the master took back in the new epoch; once x is removed,
    # its slot goes to y.
    assert node.node.adopted == 1
    assert local.remove(["x"]) == 1
    assert local.put_many([("y", y)]) == [True]
    assert local.match_prefix(["y"]).locations[0].offset == old_local.locations[0].offset
    # Over TCP the node refuses a read of the old epoch. A client that holds the new epoch
    # reads nothing of the old; one that maps the segment afresh is refused by y's header.
    assert remote.read(old_remote).objects == (None,)
    assert local.read(old_local).objects == (None,)
    got = client_factory(host_id="host-a").read(old_local)
    assert (got.objects, got.rejected) == ((None,), (Rejection.KEY,))
    assert local.get_many(["x", "y"]) == [None, y]
    assert remote.get_many(["y"]) == [y]


def test_finding7_clients_let_go_of_a_restarted_nodes_segment(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node = node_factory("n")
    local, remote = client_factory(host_id="host-a"), client_factory(host_id="host-b")
    assert local.put_many([("before", b"1" * 5000)]) == [True]
    path = node.node.segment.path
    node.stop(grace=0)
    again = node_factory("n")  # same id, same process: same path, a new segment
    wait_for(lambda: len(remote.status().nodes) == 1, what="node back")
    assert local.put_many([("after", b"2" * 5000)]) == [True]
    # Before: the local client kept writing into the unlinked segment it still had mapped, so
    # a remote reader found zeros where "after" should be.
    assert remote.get_many(["after"]) == [b"2" * 5000]
    assert local.get_many(["after"]) == [b"2" * 5000]
    with open("/proc/self/maps") as maps:
        assert [line for line in maps if path in line and "(deleted)" in line] == []
    dropped = local.metrics.registry.get_sample_value(
        "pantry_kv_client_transports_dropped_total", {"reason": "epoch"})
    assert dropped == 1
    assert local.metrics.registry.get_sample_value("pantry_kv_client_transports_open") == 1
    again.stop(grace=0)  # before the fixture checks the first node's (same) path is gone


@contextmanager
def pool(config: MasterConfig, dram: int) -> Iterator[tuple[KVStoreClient, NodeServer]]:
    master = start_master(config)
    address = f"127.0.0.1:{master.port}"
    node = start_node(NodeConfig(master_address=address, node_id=f"ev-{os.getpid()}",
                                 dram_bytes=dram, host_id="host-a", heartbeat_s=0.2,
                                 max_object_bytes=config.max_object_bytes, prefault=False))
    client = KVStoreClient(address, host_id="host-a",
                           config=ClientConfig(max_object_bytes=config.max_object_bytes))
    try:
        wait_for(lambda: len(client.status().nodes) == 1, what="node registered")
        yield client, node
    finally:
        client.close()
        node.stop(grace=0)
        master.stop(grace=0)


def test_finding3_one_put_evicts_nothing_when_no_block_can_be_freed() -> None:
    config = MasterConfig(port=0, lease_ms=60_000, high_watermark=1.0, low_watermark=1.0,
                          max_object_bytes=1 * MIB, max_keys_per_request=4096)
    with pool(config, 8 * MIB) as (c, _):
        # 2,048 objects of exactly 4 KiB (a 64-byte header each) fill the 8 MiB node.
        items = [(f"o{i:04d}", bytes([i % 251]) * (4 * KIB - 64)) for i in range(2048)]
        assert c.put_many(items) == [True] * 2048
        # One leased object in every MiB: no 1 MiB block can be made free.
        assert None not in c.get_many([items[256 * i + 7][0] for i in range(8)])
        assert c.put_many([("big", b"x" * (1 * MIB - 64))]) == [False]
        s = c.status()
        # Before: 2,040 objects evicted, and still NO_SPACE.
        assert (s.evictions, s.objects) == (0, 2048)


def test_finding5_keys_and_request_sizes_are_limited(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node_factory("n")
    c = client_factory(host_id="host-b")
    assert c.put_many([("ok", b"v")]) == [True]
    with grpc.insecure_channel(master_address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        for keys, code, words in (
            (["k" * 257], grpc.StatusCode.INVALID_ARGUMENT, "keys[0]: 'kkkk"),
            (["ok", "a b"], grpc.StatusCode.INVALID_ARGUMENT, "keys[1]: 'a b' is not a key"),
            ([""], grpc.StatusCode.INVALID_ARGUMENT, "keys[0]: '' is not a key"),
            (["ok"] * 65, grpc.StatusCode.RESOURCE_EXHAUSTED,
             "keys: 65 keys in one request; max_keys_per_request is 64"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetReplicas(pb.KeysRequest(keys=keys))
            assert err.value.code() == code
            assert words in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.PutStart(pb.PutStartRequest(keys=["x\n"], sizes=[1]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidKeyError, match=r"items\[0\]"):
        c.put_many([("bad key", b"v")])
    with pytest.raises(InvalidKeyError, match=r"keys\[0\]"):
        c.get_many(["k" * 257])
    assert c.get_many(["ok"]) == [b"v"]  # nothing else harmed


def test_finding5_the_node_checks_every_request_before_acting(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str
) -> None:
    node = node_factory("n")
    epoch = node.node.epoch
    with grpc.insecure_channel(master_address) as ch:
        r = pb_grpc.KVMasterStub(ch).PutStart(pb.PutStartRequest(keys=["a"], sizes=[100]))
    grant = r.slots[0].grant
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.KVNodeStub(ch)

        def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            return err.value.code(), err.value.details() or ""

        forged = pb.WriteGrant(offset=0, length=100, epoch=epoch, token=1,
                               expires_unix_ms=2**62, mac=b"\0" * 16)
        assert refused(lambda: stub.Write(pb.WriteRequest(ops=[
            pb.WriteOp(grant=grant, data=b"a" * 100),
            pb.WriteOp(grant=forged, data=b"f" * 100)]))) == (
            grpc.StatusCode.PERMISSION_DENIED, "write grant is not valid for this node")
        assert refused(lambda: stub.Write(pb.WriteRequest(ops=[
            pb.WriteOp(grant=grant, data=b"a" * 101)]))) == (
            grpc.StatusCode.PERMISSION_DENIED, "write of 101 bytes under a grant of 100")
        assert node.node.segment.read(0, 100) == b"\0" * 100  # nothing of it was written
        stub.Write(pb.WriteRequest(ops=[pb.WriteOp(grant=grant, data=b"a" * 100)]))
        assert node.node.segment.read(0, 100) == b"a" * 100
        ops = [pb.ReadOp(offset=0, length=1)] * (node.node.config.max_ops_per_request + 1)
        assert refused(lambda: stub.Read(pb.ReadRequest(ops=ops, epoch=epoch)))[0] == (
            grpc.StatusCode.RESOURCE_EXHAUSTED)
        big = [pb.ReadOp(offset=0, length=4 * MIB)] * 2
        assert refused(lambda: stub.Read(pb.ReadRequest(ops=big, epoch=epoch))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"read of {8 * MIB} bytes in one request; max_request_bytes is {5 * MIB}")
        code, why = refused(lambda: stub.Read(pb.ReadRequest(
            ops=[pb.ReadOp(offset=0, length=1)], epoch=epoch - 1)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in why


def test_finding5_tcp_declared_sizes_are_checked_before_any_allocation(
    node_factory: NodeFactory
) -> None:
    node = node_factory("n")
    host, _, port = node.node.tcp_address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("<4sH", b"PKA1", 0))  # the handshake: this pool has no token
        assert s.recv(16, socket.MSG_WAITALL) == struct.pack("<4sBxxxQ", b"PKT2", 0, 0)
        # One write declaring a terabyte: before, the node allocated a buffer of that size to
        # drain it. Now it answers at once and drops the connection unread.
        head = struct.pack("<4sBxxxIQ", b"PKT2", 2, 1, 0)
        s.sendall(head + struct.pack("<QQQQQ16s", 0, 1 << 40, node.node.epoch, 1, 2**62,
                                     b"\0" * 16))
        magic, status, length = struct.unpack("<4sBxxxQ", s.recv(16, socket.MSG_WAITALL))
        body = s.recv(length, socket.MSG_WAITALL).decode()
        assert (magic, status) == (b"PKT2", 1)
        assert body == f"{1 << 40} bytes in one request; max_request_bytes is {256 * MIB}"
        assert s.recv(1) == b""
    # The node serves on.
    t = TcpTransport(node.node.tcp_address, 5.0, node.node.epoch)
    try:
        assert t.read([(0, 4)]) == [b"\0" * 4]
    finally:
        t.close()
