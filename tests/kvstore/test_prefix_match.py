"""The compact prefix match: block keys packed on the way in, packed location columns on the way
out, over a real master and nodes. (How fast it is: bench/pool_throughput.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from kv_helpers import raw_size

from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.master import Master
from kvstore.metadata import SSD, NodeInfo, ObjectMeta, ObjectState
from kvstore.node_service import NodeServer
from kvstore.prefix_match import compact_from_proto, compact_to_proto, pack_keys, unpack_keys
from kvstore.wire import node_to_proto
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc


def block_key(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def stub(master_address: str) -> Iterator[pb_grpc.KVMasterStub]:
    with grpc.insecure_channel(master_address) as ch:
        yield pb_grpc.KVMasterStub(ch)


def test_pack_keys_takes_only_block_keys() -> None:
    keys = [block_key(1), "ab" * 16]
    packed = pack_keys(keys)
    assert packed == bytes(15) + b"\x01" + b"\xab" * 16
    assert packed is not None and unpack_keys(packed, 2) == keys
    assert pack_keys([]) == b"" and unpack_keys(b"", 0) == []
    assert pack_keys(["AB" * 16]) is None  # upper case: a key, but not a block key
    assert pack_keys(["a" * 31 + " "]) is None
    assert pack_keys(["a" * 31, "a" * 33]) is None  # the right total, the wrong boundaries
    assert pack_keys(["k0"]) is None


def test_match_prefix_answers_compact_columns(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    a = node_factory("a")
    c = client_factory(host_id="host-b")
    keys = [block_key(i) for i in range(5)]
    assert c.put_many([(k, bytes([i]) * 1000) for i, k in enumerate(keys[:2])]) == [True] * 2
    b = node_factory("b")  # empty: the next objects go to it
    assert c.put_many([(k, bytes([i]) * 2000) for i, k in enumerate(keys[2:4])]) == [True] * 2
    m = c.match_prefix(keys)  # keys[4] was never stored
    assert m.matched == 4 and list(m.keys) == keys[:4]
    ids = [a.node.config.node_id] * 2 + [b.node.config.node_id] * 2
    assert [m.nodes[i].node_id for i in m.node_index] == ids
    assert [loc.node_id for loc in m.locations] == ids
    assert list(m.lengths) == [raw_size(1000, keys[0])] * 2 + [raw_size(2000, keys[0])] * 2
    assert len(m.epochs) == 0  # every location of its node's registration: no epoch column
    assert [loc.epoch for loc in m.locations] == [a.node.epoch] * 2 + [b.node.epoch] * 2
    assert m.tiers == ()  # every location in DRAM: no tier column at all
    assert [loc.tier for loc in m.locations] == ["dram"] * 4
    # The offsets are where the objects are: each reads back intact from them.
    got = c.read(m)
    assert [bytes(o.payload) if o else None for o in got.objects] == [
        bytes([0]) * 1000, bytes([1]) * 1000, bytes([0]) * 2000, bytes([1]) * 2000]
    assert c.match_prefix([keys[4], *keys[:4]]).matched == 0
    assert c.match_prefix([]).matched == 0


def test_match_prefix_of_string_keys_is_compact_too(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    node = node_factory("a")
    c = client_factory(host_id="host-b")
    assert c.put_many([("k0", b"x" * 10), ("k1", b"y" * 10)]) == [True, True]
    m = c.match_prefix(["k0", "k1", "k2", "k0"])
    assert m.matched == 2 and list(m.keys) == ["k0", "k1"]
    assert [loc.node_id for loc in m.locations] == [node.node.config.node_id] * 2
    assert list(m.lengths) == [raw_size(10, "k0")] * 2


def test_the_master_serves_the_old_form_and_refuses_bad_packed_keys(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        stub: pb_grpc.KVMasterStub) -> None:
    node = node_factory("a")
    c = client_factory(host_id="host-b")
    assert c.put_many([(block_key(7), b"z" * 100)]) == [True]
    packed = bytes.fromhex(block_key(7))
    old = stub.MatchPrefix(pb.KeysRequest(packed_keys=packed))
    assert old.matched == 1 and len(old.node_index) == 0
    assert [(x.key, x.node_id, x.length) for x in old.locations] == [
        (block_key(7), node.node.config.node_id, raw_size(100, block_key(7)))]
    new = stub.MatchPrefix(pb.KeysRequest(packed_keys=packed, compact=True))
    assert (new.matched, len(new.locations), list(new.node_index)) == (1, 0, [0])
    with pytest.raises(grpc.RpcError) as e:
        stub.MatchPrefix(pb.KeysRequest(packed_keys=packed[:15]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "15 bytes is not a whole number of 16-byte keys" in str(e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.MatchPrefix(pb.KeysRequest(packed_keys=packed, keys=[block_key(7)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "set keys or packed_keys, not both" in str(e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.MatchPrefix(pb.KeysRequest(packed_keys=bytes(16 * 16_385)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16385 keys in one request; max_keys_per_request is 16384" in str(e.value.details())


def test_compact_columns_carry_stale_epochs_and_tiers_and_stop_at_a_dropped_node() -> None:
    def meta(key: str, node: str, offset: int, epoch: int, tier: str = "dram") -> ObjectMeta:
        return ObjectMeta(key, node, offset, 100, 4096, ObjectState.SEALED, 0.0, epoch, 1,
                          tier)

    nodes = [node_to_proto(NodeInfo(n, "h", "addr", "", 0, epoch=e))
             for n, e in (("n1", 6), ("n2", 9))]
    metas = [meta("a", "n1", 0, 6), meta("b", "n2", 4096, 8, SSD), meta("c", "n1", 8192, 6),
             meta("d", "gone", 0, 1), meta("e", "n1", 12288, 6)]
    resp = pb.MatchPrefixResponse(nodes=nodes)
    compact_to_proto(metas, nodes, resp)
    assert resp.matched == 3  # "d"'s node was dropped since the lookup: the run stops there
    assert list(resp.node_index) == [0, 1, 0] and list(resp.offsets) == [0, 4096, 8192]
    assert list(resp.epochs) == [6, 8, 6]  # one is stale: the column is sent
    assert list(resp.tier_names) == ["dram", "ssd"] and list(resp.tiers) == [0, 1, 0]
    m = compact_from_proto(["a", "b", "c", "d", "e"], resp)
    assert [(x.key, x.node_id, x.offset, x.epoch, x.tier) for x in m.locations] == [
        ("a", "n1", 0, 6, "dram"), ("b", "n2", 4096, 8, "ssd"), ("c", "n1", 8192, 6, "dram")]


def test_packed_columns_are_little_endian_arrays() -> None:
    def meta(key: str, node: str, offset: int, length: int) -> ObjectMeta:
        return ObjectMeta(key, node, offset, length, 4096, ObjectState.SEALED, 0.0, 6, 1)

    one = [node_to_proto(NodeInfo("n1", "h", "addr", "", 0, epoch=6))]
    resp = pb.MatchPrefixResponse(nodes=one)
    compact_to_proto([meta("a", "n1", 4096, 100), meta("b", "n1", 2**40, 7)], one, resp,
                     packed=True, current=True, dram_only=True)
    assert (resp.matched, len(resp.offsets), len(resp.node_index)) == (2, 0, 0)
    assert resp.node_index_packed == b""  # one node: every index is 0, none sent
    assert resp.offsets_packed == (4096).to_bytes(8, "little") + (2**40).to_bytes(8, "little")
    assert resp.lengths_packed == (100).to_bytes(8, "little") + (7).to_bytes(8, "little")
    m = compact_from_proto(["a", "b", "c"], resp)
    assert [(x.key, x.node_id, x.offset, x.length) for x in m.locations] == [
        ("a", "n1", 4096, 100), ("b", "n1", 2**40, 7)]
    two = [*one, node_to_proto(NodeInfo("n2", "h", "addr", "", 0, epoch=6))]
    resp = pb.MatchPrefixResponse(nodes=two)
    compact_to_proto([meta("a", "n2", 0, 1), meta("b", "n1", 8, 2)], two, resp, packed=True)
    assert resp.node_index_packed == (1).to_bytes(4, "little") + bytes(4)
    assert list(compact_from_proto(["a", "b"], resp).node_index) == [1, 0]
    resp.lengths_packed = resp.lengths_packed[:-1]
    with pytest.raises(ValueError, match="15 bytes: not whole 8-byte integers"):
        compact_from_proto(["a", "b"], resp)
    resp.lengths_packed = bytes(8)
    with pytest.raises(ValueError, match="prefix match of 2 locations with columns of 2, 2 "
                                         "and 1 over 2 nodes"):
        compact_from_proto(["a", "b"], resp)


def test_a_run_of_lone_replicas_goes_on_key_by_key_past_a_replicated_object() -> None:
    m = Master(MasterConfig(lease_ms=1000))
    for n in ("n1", "n2"):
        m.register_node(NodeInfo(n, "h", "addr", "", 64 * 1024))
    grants = m.put_start(["a", "b", "c"], [100, 100, 100], replicas=1)
    (two,) = m.put_start(["r"], [100], replicas=2)
    tickets = [(g.key, g.location.token) for g in [*grants, two] if g.location is not None]
    assert m.put_end(tickets) == [True] * 4
    run = m.match_run(["a", "r", "b", "c", "missing", "a"])
    assert [x.key for x in run.replicas] == ["a", "r", "b", "c"]
    assert run.dram_only and [n.node_id for n in run.nodes] == ["n1", "n2"]
    assert {x.node_id for x in run.replicas if x.key != "r"} <= {"n1", "n2"}
    assert m.stats().active_leases == 4  # every replica handed out is leased
