"""The RDMA transport. What needs no device runs everywhere: the endpoint's checks and wire
form, the queue pair attributes built from a peer's endpoint, the table of registered regions,
how ops split into work requests, the node's RdmaConnect answers on a real node, and the
client's choice of transport. One-sided traffic runs only where `ibv_devices` lists a device."""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import pytest

from kvstore.client import KVStoreClient
from kvstore.grants import WriteGrant
from kvstore.node_service import NodeServer
from kvstore.transports import TransportError
from kvstore.transports.rdma import RdmaTransport, has_rdma_device, rdma_devices
from kvstore.transports.rdma_exchange import (
    Endpoint,
    MrTable,
    RdmaError,
    Region,
    RemoteSegment,
    WorkRequest,
    endpoint_from_proto,
    endpoint_to_proto,
    gather,
    gid_from_text,
    plan,
    qp_attr,
    scatter,
)
from pantry.common.config_flags import KIB, MIB
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

NodeFactory = Callable[..., NodeServer]
ClientFactory = Callable[..., KVStoreClient]

NO_DEVICE = "no RDMA device: ibv_devices lists none here (pyverbs get_device_list is empty)"
needs_device = pytest.mark.skipif(not rdma_devices(), reason=NO_DEVICE)

GID = bytes.fromhex("fe800000000000000202c9fffe000001")
CLIENT = Endpoint(qpn=0x1234, psn=0xABCDEF, lid=7, gid=GID, mtu=5)
NODE = Endpoint(qpn=0x00FF01, psn=42, lid=9, gid=bytes(range(16)), mtu=3)


def test_endpoint_wire_form_round_trips_exactly() -> None:
    msg = endpoint_to_proto(CLIENT)
    assert (msg.qpn, msg.psn, msg.lid, msg.gid, msg.mtu) == (0x1234, 0xABCDEF, 7, GID, 5)
    again = pb.RdmaEndpoint.FromString(msg.SerializeToString())
    assert endpoint_from_proto(again) == CLIENT
    assert CLIENT.gid_text == "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    assert gid_from_text(CLIENT.gid_text) == GID


@pytest.mark.parametrize(("fields", "message"), [
    ({"qpn": 1 << 24}, "qpn must fit in 24 bits, got 16777216"),
    ({"psn": -1}, "psn must fit in 24 bits, got -1"),
    ({"lid": 1 << 16}, "lid must fit in 16 bits, got 65536"),
    ({"gid": b"\x00" * 4}, "gid must be 16 bytes, got 4"),
    ({"mtu": 0}, r"mtu must be an ibv_mtu in 1..5, got 0"),
    ({"qpn": 0}, "qpn 0 is the subnet management QP"),
])
def test_a_bad_endpoint_is_refused_naming_the_field(fields: dict[str, object],
                                                     message: str) -> None:
    values: dict[str, object] = {"qpn": 5, "psn": 1, "lid": 1, "gid": GID, "mtu": 3, **fields}
    with pytest.raises(RdmaError, match=message):
        Endpoint(**values)  # type: ignore[arg-type]
    with pytest.raises(RdmaError, match="a GID is 16 bytes"):
        gid_from_text("fe80::1")


def test_queue_pair_attributes_connect_to_the_peer() -> None:
    pytest.importorskip("pyverbs.qp", reason="pyverbs (python3-pyverbs) is not installed")
    attr = qp_attr(local=CLIENT, remote=NODE, sgid_index=3)
    assert (attr.dest_qp_num, attr.rq_psn, attr.sq_psn) == (0x00FF01, 42, 0xABCDEF)
    assert attr.path_mtu == 3  # the smaller of both ends' MTUs
    assert (attr.port_num, attr.max_rd_atomic, attr.max_dest_rd_atomic) == (1, 1, 1)
    assert (attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.min_rnr_timer) == (14, 7, 7, 12)
    ah = attr.ah_attr
    assert (ah.dlid, ah.port_num, ah.is_global, ah.sgid_index) == (9, 1, 1, 3)
    assert ah.dgid == NODE.gid_text


def test_mr_table_keeps_regions_apart_and_finds_the_lkey_of_a_buffer() -> None:
    t = MrTable()
    t.add(Region("segment", 0x10000, 64 * KIB, lkey=11, rkey=12))
    t.add(Region("stage", 0x30000, 4 * KIB, lkey=21, rkey=22))
    assert len(t) == 2
    assert t.covering(0x10000 + 100, 200).lkey == 11
    assert t.covering(0x30000, 4 * KIB).name == "stage"
    with pytest.raises(RdmaError, match=r"\[0x30ffe, 0x31002\) is in no registered region"):
        t.covering(0x30000 + 4 * KIB - 2, 4)
    with pytest.raises(RdmaError, match="'more' overlaps 'segment'"):
        t.add(Region("more", 0x10000 + 64 * KIB - 1, 10, 1, 1))
    with pytest.raises(RdmaError, match="'stage' is registered already"):
        t.add(Region("stage", 0x90000, 10, 1, 1))
    with pytest.raises(RdmaError, match="'empty' has no bytes"):
        t.add(Region("empty", 0x90000, 0, 1, 1))
    assert t.remove("stage").rkey == 22 and len(t) == 1
    t.add(Region("more", 0x30000, 10, 1, 1))  # the range is free again


def test_ops_become_rounds_of_work_requests_that_fit_the_stage() -> None:
    stage = Region("stage", 0x1000_0000, 1 * MIB, 5, 6)
    remote = RemoteSegment(addr=0x7F00_0000_0000, rkey=99, length=8 * MIB)
    ops = [(0, 300 * KIB), (1 * MIB, 900 * KIB), (4 * MIB, 1 * MIB + 100 * KIB)]
    rounds = plan(ops, stage, remote)
    r = remote.addr
    assert rounds == [
        [WorkRequest(0, stage.addr, r, 300 * KIB),
         WorkRequest(1, stage.addr + 300 * KIB, r + 1 * MIB, 724 * KIB)],
        [WorkRequest(1, stage.addr, r + 1 * MIB + 724 * KIB, 176 * KIB),
         WorkRequest(2, stage.addr + 176 * KIB, r + 4 * MIB, 848 * KIB)],
        [WorkRequest(2, stage.addr, r + 4 * MIB + 848 * KIB, 276 * KIB)],
    ]
    # Every byte of every op is moved exactly once.
    for i, (_, n) in enumerate(ops):
        assert sum(w.length for rnd in rounds for w in rnd if w.op == i) == n
    # A round posts at most max_wrs requests.
    small = plan([(i * 4 * KIB, 4 * KIB) for i in range(5)], stage, remote, max_wrs=2)
    assert [[w.op for w in rnd] for rnd in small] == [[0, 1], [2, 3], [4]]
    with pytest.raises(TransportError, match=r"range \[8388600, 8388616\) outside segment"):
        plan([(8 * MIB - 8, 16)], stage, remote)


def test_gather_and_scatter_move_exact_slices_across_parts() -> None:
    parts = [memoryview(b"header--"), memoryview(b"payload-bytes")]
    dst = bytearray(7)
    gather(parts, 5, memoryview(dst))  # the slice straddles both parts
    assert bytes(dst) == b"r--payl"
    views = [memoryview(bytearray(4)), memoryview(bytearray(6))]
    scatter(views, 2, memoryview(b"ABCDEF"))
    assert [bytes(v) for v in views] == [b"\x00\x00AB", b"CDEF\x00\x00"]


def test_a_node_without_a_device_refuses_rdma_connect_and_says_what_to_use(
    node_factory: NodeFactory
) -> None:
    if rdma_devices():
        pytest.skip("this host has an RDMA device: its nodes accept RdmaConnect")
    node = node_factory("n")
    assert node.rdma is None
    with grpc.insecure_channel(node.address) as ch:
        stub = pb_grpc.KVNodeStub(ch)
        good = pb.RdmaConnectRequest(client=endpoint_to_proto(CLIENT), epoch=node.node.epoch)
        with pytest.raises(grpc.RpcError) as err:
            stub.RdmaConnect(good)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == (f"node {node.node.config.node_id} has no RDMA device "
                                       "(ibv_devices lists none here); use the tcp or grpc "
                                       "transport")
        # Bad input is named as such before anything else.
        bad = pb.RdmaConnectRequest(client=pb.RdmaEndpoint(qpn=5, psn=1, lid=1, gid=b"x", mtu=3))
        with pytest.raises(grpc.RpcError) as err:
            stub.RdmaConnect(bad)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "rdma endpoint gid must be 16 bytes, got 1"
    # The node still serves.
    assert node.node.segment.size == 8 * MIB


def test_without_a_device_a_remote_client_uses_tcp(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    if has_rdma_device():
        pytest.skip("this host has an RDMA device: the client would choose rdma")
    node = node_factory("n", host_id="host-a")
    c = client_factory(host_id="host-b")
    assert c.put_many([("k", b"v" * 5000)]) == [True]
    (info,) = [n.node for n in c.status().nodes]
    assert c.transport_name(info) == "tcp"
    assert c.get_many(["k"]) == [b"v" * 5000]
    with pytest.raises(RdmaError, match="no RDMA device here"):
        RdmaTransport(node.address, node.node.epoch, "", 2.0, 1 * MIB)


def test_a_client_whose_device_cannot_reach_the_node_falls_back_to_tcp(
    node_factory: NodeFactory, client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client believes it has a device (the only stand-in here: no device exists); opening
    # it fails, as it does when the node has none, and the client goes on over tcp.
    monkeypatch.setattr("kvstore.client.has_rdma_device", lambda: True)
    node_factory("n", host_id="host-a")
    c = client_factory(host_id="host-b")
    assert c.put_many([("k", b"w" * 3000)]) == [True]
    (info,) = [n.node for n in c.status().nodes]
    assert c.transport_name(info) == ("rdma" if rdma_devices() else "tcp")
    assert c.get_many(["k"]) == [b"w" * 3000]


@needs_device
def test_one_sided_write_and_read_on_a_real_device(node_factory: NodeFactory) -> None:
    node = node_factory("n")
    assert node.rdma is not None
    t = RdmaTransport(node.address, node.node.epoch, "", 5.0, 1 * MIB)
    try:
        a, b = os.urandom(3000), os.urandom(2 * MIB + 123)  # b spans three rounds of the stage
        grants = [WriteGrant(0, len(a), node.node.epoch, 1, 0, b""),
                  WriteGrant(1 * MIB, len(b), node.node.epoch, 2, 0, b"")]
        t.write([(grants[0], a), (grants[1], [b[:100], b[100:]])])
        assert node.node.segment.read(0, len(a)) == a
        assert node.node.segment.read(1 * MIB, len(b)) == b
        assert t.read([(1 * MIB, len(b)), (0, len(a))]) == [b, a]
        head, rest = bytearray(64), bytearray(len(b) - 64)
        t.read_into([(1 * MIB, [memoryview(head), memoryview(rest)])])
        assert bytes(head + rest) == b
        with pytest.raises(TransportError, match="outside segment"):
            t.read([(8 * MIB - 1, 2)])
    finally:
        t.close()


@needs_device
def test_a_remote_client_chooses_rdma_when_both_ends_have_a_device(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("n", host_id="host-a")
    c = client_factory(host_id="host-b")
    blobs = [(f"k{i}", os.urandom(100_000 + i)) for i in range(8)]
    assert c.put_many(blobs) == [True] * 8
    (info,) = [n.node for n in c.status().nodes]
    assert c.transport_name(info) == "rdma"
    assert c.get_many([k for k, _ in blobs]) == [v for _, v in blobs]
