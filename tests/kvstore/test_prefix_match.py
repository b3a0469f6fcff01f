"""The compact prefix match: block keys packed on the way in, packed location columns on the way
out, over a real master and nodes. (How fast it is: bench/pool_throughput.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import pytest
from kv_helpers import raw_size

from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.master import Master
from kvstore.metadata import SSD, NodeInfo, ObjectMeta, ObjectState
from kvstore.node_service import NodeServer
from kvstore.object_index import LONE_FIELDS, LONE_LOCATION
from kvstore.prefix_match import (
    compact_from_proto,
    compact_to_proto,
    pack_keys,
    run_to_locations,
    run_to_proto,
    unpack_keys,
)
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


def test_pack_keys_checks_every_key_in_one_round_trip() -> None:
    a, b = block_key(1), block_key(2)
    assert pack_keys([a, b]) == bytes.fromhex(a + b)
    assert pack_keys([a, "ab" * 16]) == bytes.fromhex(a) + b"\xab" * 16
    assert pack_keys([a, "AB" * 16]) is None  # fromhex takes it; the round trip does not
    assert pack_keys([a, "0" * 30 + "\t0"]) is None  # whitespace inside a key
    assert pack_keys([a, "0" * 15 + " " + "0" * 16]) is None  # a space: the length differs
    assert pack_keys([a[:30] + " " + a[30:], "0" * 31]) is None  # right total, spaces moved
    assert pack_keys([a, "0" * 31 + "g"]) is None


def _lone_master(nodes: int = 1) -> tuple[Master, list[str]]:
    m = Master(MasterConfig(lease_ms=1000))
    for n in range(1, nodes + 1):
        m.register_node(NodeInfo(f"n{n}", "h", "addr", "", 64 * 1024))
    return m, [block_key(i) for i in range(6)]


def _put(m: Master, keys: list[str], sizes: list[int], replicas: int = 1) -> None:
    grants = m.put_start(keys, sizes, replicas=replicas)
    tickets = [(g.key, g.location.token) for g in grants if g.location is not None]
    assert m.put_end(tickets) == [True] * len(keys)


def test_the_index_holds_lone_replicas_packed_and_a_run_stops_at_the_first_other() -> None:
    m, keys = _lone_master()
    _put(m, keys[:4], [100, 5000, 300, 400])
    index = m._backend
    got = index.lone_run([keys[0], keys[1], keys[5], keys[2]])  # keys[5] was never stored
    assert len(got) == 2 * LONE_LOCATION.size
    records = [index.get(k).replicas[0] for k in keys[:2]]  # type: ignore[union-attr]
    assert [LONE_LOCATION.unpack_from(got, i * LONE_LOCATION.size) for i in range(2)] == [
        (r.offset, r.length, 0, r.slot_bytes, r.token) for r in records]
    # (Where the slots are is the allocator's business: the index holds what it chose.)
    assert [r.length for r in records] == [100, 5000] and records[0].offset != records[1].offset
    assert index.node_id_of(0) == "n1"
    index.delete(keys[1])
    assert len(index.lone_run(keys[:3])) == LONE_LOCATION.size
    assert index.lone_run([]) == b"" and index.lone_run([keys[5]]) == b""


def test_a_run_answers_columns_and_replicas_equal_to_the_records() -> None:
    m, keys = _lone_master(nodes=2)
    _put(m, keys[:2], [100, 200])  # both nodes empty: placement picks, we read it back
    _put(m, [keys[2]], [300], replicas=2)  # not lone: matched key by key
    _put(m, [keys[3]], [400])
    run = m.match_run([*keys[:4], keys[5], keys[0]])
    assert run.keys == keys[:4] and run.matched == 4 and run.dram_only
    records = [m._backend.get(k) for k in keys[:4]]
    lone = [r.replicas[0] for r in (records[0], records[1], records[3]) if r is not None]
    # The lone run spans both nodes (leased and touched node by node), and keys[3] is lone
    # but after the replicated key: the key-by-key part holds it.
    assert {lone[0].node_id, lone[1].node_id} == {"n1", "n2"}
    assert m.stats().active_leases == 4
    assert len(run.lone) == 2 * len(LONE_FIELDS) and len(run.rest) == 2
    assert list(run.offsets) == [lone[0].offset, lone[1].offset, run.rest[0].offset,
                                 lone[2].offset]
    assert list(run.lengths) == [100, 200, 300, 400]
    assert [n.node_id for n in run.nodes] == ["n1", "n2"]
    assert run.node_index is not None
    assert [run.nodes[i].node_id for i in run.node_index] == [
        lone[0].node_id, lone[1].node_id, run.rest[0].node_id, lone[2].node_id]
    assert list(run.replicas) == [lone[0], lone[1], run.rest[0], lone[2]]
    assert m.match_prefix(keys[:2]) == lone[:2]
    resp = pb.MatchPrefixResponse(nodes=[node_to_proto(n) for n in run.nodes])
    run_to_proto(run, resp, packed=True)
    assert resp.matched == 4 and resp.node_index_packed == b"".join(
        i.to_bytes(4, "little") for i in run.node_index)
    assert resp.lengths_packed == b"".join(x.to_bytes(8, "little") for x in (100, 200, 300, 400))
    assert (len(resp.epochs), len(resp.tiers)) == (0, 0)
    m2 = compact_from_proto(keys, resp)
    assert [(x.key, x.node_id, x.offset, x.length) for x in m2.locations] == [
        (r.key, r.node_id, r.offset, r.length) for r in run.replicas]
    old = pb.MatchPrefixResponse()
    run_to_locations(run, old)  # the old form, one message per location
    assert old.matched == 4 and [(x.key, x.node_id, x.offset, x.length, x.epoch, x.tier)
                                 for x in old.locations] == [
        (r.key, r.node_id, r.offset, r.length, r.epoch, r.tier) for r in run.replicas]


def test_a_run_on_one_node_sends_no_node_column_and_names_an_ssd_tail() -> None:
    m, keys = _lone_master()
    _put(m, keys[:3], [100, 200, 300])
    obj = m._backend.get(keys[2])
    assert obj is not None
    ssd = replace(obj.replicas[0], tier=SSD)
    m._backend.put(replace(obj, replicas=(ssd,)))  # as a spill that dropped the DRAM copy
    run = m.match_run(keys[:3])
    assert run.node_index is None and run.tiers == ("dram", "dram", "ssd")
    assert not run.dram_only and list(run.replicas)[2] == ssd
    packed = pb.MatchPrefixResponse(nodes=[node_to_proto(run.nodes[0])])
    run_to_proto(run, packed, packed=True)
    assert (packed.matched, packed.node_index_packed) == (3, b"")
    assert list(packed.tier_names) == ["dram", "ssd"] and list(packed.tiers) == [0, 0, 1]
    plain = pb.MatchPrefixResponse(nodes=[node_to_proto(run.nodes[0])])
    run_to_proto(run, plain)
    assert list(plain.node_index) == [0, 0, 0] and list(plain.lengths) == [100, 200, 300]
    assert list(plain.offsets) == list(run.offsets)
    assert [x.tier for x in compact_from_proto(keys, packed).locations] == [
        "dram", "dram", "ssd"]
    old = pb.MatchPrefixResponse()
    run_to_locations(run, old)
    assert [(x.node_id, x.length, x.tier) for x in old.locations] == [
        ("n1", 100, "dram"), ("n1", 200, "dram"), ("n1", 300, "ssd")]
    # The leases and touches of the run are those of a key-by-key match.
    assert m.stats().active_leases == 3 and m.stats().blocks_matched == 3
