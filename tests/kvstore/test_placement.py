"""Reads planned from columns (kvstore.placement): a prefix match is read straight from its
offset and length arrays, grouped by node, with no BlockLocation per key; every check and the
failover to another replica stay. Real master and node servers on loopback."""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable

import pytest

from kvstore.block_object import BlockLayout, Rejection, header_size
from kvstore.client import KVStoreClient, PrefixMatch
from kvstore.config import MasterConfig
from kvstore.metadata import DRAM, SSD, BlockLocation, NodeInfo
from kvstore.node_service import NodeServer
from kvstore.placement import NOWHERE, Placement
from pantry.common.config_flags import MIB

LAYOUT = BlockLayout("test-fp", "float32", (4, 256))  # 4096 bytes of payload
PAYLOAD = 4096


@pytest.fixture
def master_config() -> MasterConfig:
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.1, lease_ms=5000,
                        max_object_bytes=4 * MIB, replicas=2)


def block_key(i: int) -> str:
    return f"{i:032x}"


def node(name: str, epoch: int = 1) -> NodeInfo:
    return NodeInfo(name, "host", f"{name}:1", "", 0, epoch=epoch)


def sample(c: KVStoreClient, name: str, **labels: str) -> float:
    return c.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_match_on_one_node_is_one_group_of_every_index() -> None:
    keys = [block_key(i) for i in range(5)]
    m = PrefixMatch(keys, (node("a"),), array("I", [0] * 5), array("Q", range(0, 500, 100)),
                    array("Q", [100] * 5))
    p = Placement.of_match(m)
    assert p.offsets is m.offsets and p.keys is m.keys  # the match's own columns
    assert p.by_node(DRAM, 5) == [(node("a"), [0, 1, 2, 3, 4])]
    assert p.by_node(DRAM, 3) == [(node("a"), [0, 1, 2])]
    assert p.by_node(SSD, 5) == []
    head = Placement.of_match(m, 2)
    assert (list(head.keys), list(head.offsets), head.node_ids) == (keys[:2], [0, 100], ["a"])
    assert "locations" not in vars(m)  # no BlockLocation was built


def test_a_match_over_nodes_groups_by_node_and_skips_stale_epochs_and_other_tiers() -> None:
    keys = [block_key(i) for i in range(6)]
    m = PrefixMatch(keys, (node("a", 7), node("b", 9)), array("I", [0, 1, 0, 1, 1, 0]),
                    array("Q", range(6)), array("Q", [10] * 6), epochs=[7, 9, 6, 9, 9, 7],
                    tiers=(DRAM, DRAM, DRAM, SSD, DRAM, DRAM))
    p = Placement.of_match(m)
    # Index 2 is of a's older registration: read from nowhere, failed over.
    assert p.by_node(DRAM, 6) == [(node("a", 7), [0, 5]), (node("b", 9), [1, 4])]
    assert p.by_node(SSD, 6) == [(node("b", 9), [3])]
    assert [p.node_id(i) for i in range(6)] == ["a", "b", "a", "b", "b", "a"]
    assert all(p.located(i) for i in range(6))


def test_locations_become_columns_with_nowhere_and_unnamed_nodes() -> None:
    locs = [BlockLocation("k0", "b", 64, 10, 3), None,
            BlockLocation("k2", "gone", 0, 20, 1), BlockLocation("k3", "b", 0, 30, 2, SSD)]
    p = Placement.of_locations(["k0", "k1", "k2", "k3"], locs, [node("b", 3)])
    assert (p.node_ids, list(p.node_index)) == (["b", "gone"], [0, NOWHERE, 1, 0])
    assert (list(p.offsets), list(p.lengths)) == ([64, 0, 0, 0], [10, 0, 20, 30])
    assert [p.located(i) for i in range(4)] == [True, False, True, True]
    # A node the answer did not name is read from nowhere; k3 is of an older registration.
    assert p.by_node(DRAM, 4) == [(node("b", 3), [0])]
    assert p.by_node(SSD, 4) == []
    assert p.node_id(2) == "gone"
    assert list(p.tiers) == [DRAM, DRAM, DRAM, SSD]
    # All in DRAM: no tier column, as in a match.
    assert Placement.of_locations(["k0"], locs[:1], [node("b", 3)]).tiers == []


@pytest.mark.parametrize("host", ["host-a", "host-b"])  # shm, tcp
def test_a_match_over_two_nodes_with_one_damaged_object_misses_only_that_key(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        host: str) -> None:
    a = node_factory("a")
    c = client_factory(host_id=host)
    keys = [block_key(i) for i in range(6)]
    data = [os.urandom(PAYLOAD) for _ in keys]
    assert c.put_many(list(zip(keys[:3], data[:3], strict=True)), LAYOUT, replicas=1) == [
        True] * 3
    b = node_factory("b")  # empty: the next objects go to it
    assert c.put_many(list(zip(keys[3:], data[3:], strict=True)), LAYOUT, replicas=1) == [
        True] * 3
    m = c.match_prefix(keys)
    ids = [m.nodes[j].node_id for j in m.node_index]
    a_id, b_id = a.node.config.node_id, b.node.config.node_id
    assert ids == [a_id] * 3 + [b_id] * 3
    assert c.transport_name(m.nodes[0]) == ("shm" if host == "host-a" else "tcp")
    # One payload byte of keys[4], on node b, flipped.
    at = m.offsets[4] + header_size(keys[4], LAYOUT) + 1000
    b.node.segment.view[at] ^= 0xFF
    buffers = [bytearray(PAYLOAD) for _ in keys]
    got = c.read_into(m, buffers, LAYOUT)
    assert [o is not None for o in got.objects] == [True, True, True, True, False, True]
    assert got.rejected == (None, None, None, None, Rejection.CHECKSUM, None)
    assert [bytes(buffers[i]) for i in (0, 1, 2, 3, 5)] == [data[i] for i in (0, 1, 2, 3, 5)]
    assert [o.key for o in got.objects if o is not None] == [keys[i] for i in (0, 1, 2, 3, 5)]
    assert got.nbytes == 6 * (header_size(keys[0], LAYOUT) + PAYLOAD)
    assert sample(c, "pantry_kv_client_objects_rejected_total", reason="checksum") == 1.0
    # The lone copy has no other replica: nothing to fail over to.
    assert sample(c, "pantry_kv_client_read_failovers_total") == 0.0
    assert "locations" not in vars(m)
    # `read` (bytes of its own) checks the same way.
    again = c.read(m, LAYOUT)
    assert [None if o is None else bytes(o.payload) for o in again.objects] == [
        *data[:4], None, data[5]]
    assert again.rejected[4] is Rejection.CHECKSUM


def test_a_damaged_replica_in_a_match_fails_over_for_that_key_alone(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    nodes = {n.node.config.node_id: n for n in (node_factory("ra"), node_factory("rb"))}
    c = client_factory(host_id="host-a")
    keys = [block_key(i) for i in range(4)]
    data = [os.urandom(PAYLOAD) for _ in keys]
    assert c.put_many(list(zip(keys, data, strict=True)), LAYOUT) == [True] * 4
    m = c.match_prefix(keys)
    assert m.matched == 4
    # Damage keys[2]'s copy on the node the match reads it from; its other copy is intact.
    there = nodes[m.nodes[m.node_index[2]].node_id]
    there.node.segment.view[m.offsets[2] + header_size(keys[2], LAYOUT) + 7] ^= 0x01
    buffers = [bytearray(PAYLOAD) for _ in keys]
    got = c.read_into(m, buffers, LAYOUT)
    assert [bytes(b) for b in buffers] == data
    assert got.rejected == (None,) * 4
    assert [o.key for o in got.objects if o is not None] == keys
    assert sample(c, "pantry_kv_client_objects_rejected_total", reason="checksum") == 1.0
    assert sample(c, "pantry_kv_client_read_failovers_total") == 1.0
    assert got.nbytes == 5 * (header_size(keys[0], LAYOUT) + PAYLOAD)  # 4 reads, 1 again
