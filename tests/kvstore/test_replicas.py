"""Replicas: placement on distinct nodes, one sealed replica per read (same host first), seal
and abort per put and per replica, removal one replica at a time, both metadata backends and
recovery; and a SIGKILLed `kvstore node` process whose objects keep reading from their other
replica."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_helpers import Clock, ProcessPool, two_node_pool, wait_for

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig
from kvstore.master import Master, PutGrant, PutOutcome
from kvstore.metadata import HeldObject, NodeInfo
from kvstore.replicas import NodeView, choose_replica, placement_order
from pantry.common.config_flags import KIB, MIB
from pantry.common.errors import ConfigError


def node(node_id: str, host: str, size: int) -> NodeInfo:
    return NodeInfo(node_id, host, f"127.0.0.1:{node_id[-1]}", f"/dev/shm/{node_id}", size)


def pool(replicas: int = 1, metadata: str = "memory") -> tuple[Master, Clock]:
    """n1 on h1 (4 MiB), n2 on h2 (8 MiB), n3 on h3 (6 MiB)."""
    clock = Clock()
    m = Master(MasterConfig(lease_ms=1000, put_timeout_s=5, node_timeout_s=3,
                            replicas=replicas, metadata=metadata), clock=clock)
    for info in (node("n1", "h1", 4 * MIB), node("n2", "h2", 8 * MIB),
                 node("n3", "h3", 6 * MIB)):
        m.register_node(info)
    return m, clock


def where(g: PutGrant) -> list[str]:
    return [meta.node_id for meta, _ in g.replicas]


def put(m: Master, key: str, host: str = "h1", replicas: int = 0,
        size: int = 4 * KIB) -> list[str]:
    (g,) = m.put_start([key], [size], host, replicas)
    assert g.outcome is PutOutcome.ALLOCATED and g.grant is not None, g
    assert m.put_end([(key, g.grant.token)]) == [True]
    return where(g)


def reader_gets(m: Master, key: str, host: str) -> str:
    """The node of the replica a reader on `host` is handed for `key`."""
    (loc,) = m.get_replicas([key], host)
    assert loc is not None, key
    return loc.node_id


def holders(m: Master, key: str) -> list[str]:
    return [meta.node_id for meta, _ in m.list_objects(key)[0] if meta.key == key]


def test_placement_writer_host_first_then_emptiest_distinct_nodes() -> None:
    m, _ = pool()
    assert put(m, "a", "h1", 2) == ["n1", "n2"]  # writer's host, then the emptiest (8 MiB)
    assert put(m, "b", "h3", 3) == ["n3", "n2", "n1"]
    assert put(m, "c", "elsewhere", 2) == ["n2", "n3"]  # no local node: emptiest first
    # More replicas than nodes: one on each node, and the answer says how many were wanted.
    (g,) = m.put_start(["d"], [100], "h2", 5)
    assert (where(g), g.wanted) == (["n2", "n3", "n1"], 5)  # n3 (6 MiB) before n1 (4 MiB)
    # Every replica of a put shares its token; each has its own grant for its own slot.
    assert g.grant is not None
    assert {meta.token for meta, _ in g.replicas} == {w.token for _, w in g.replicas} == {
        g.grant.token}
    assert [w.epoch for _, w in g.replicas] == [m.node(n).epoch for n in ("n2", "n3", "n1")]


def test_pool_default_and_its_validation() -> None:
    m, _ = pool(replicas=2)
    assert put(m, "a", "h3") == ["n3", "n2"]
    assert put(m, "b", "h3", replicas=1) == ["n3"]
    with pytest.raises(ConfigError, match="replicas must be in"):
        MasterConfig(replicas=0)
    with pytest.raises(ConfigError, match="replicas must be in"):
        MasterConfig(replicas=9)


def test_pure_choices_on_hand_made_views() -> None:
    views = [NodeView("a", "h1", 10), NodeView("b", "h2", 30), NodeView("c", "h2", 20),
             NodeView("d", "h3", 99, draining=True)]
    assert placement_order(views, "h2", True) == ["b", "c", "a"]
    assert placement_order(views, "h2", False, exclude={"b"}) == ["c", "a"]
    assert placement_order(views, "", True) == ["b", "c", "a"]
    m, _ = pool()
    put(m, "k", "h1", 3)
    reps = [meta for meta, _ in m.list_objects("k")[0]]
    by_id = {v.node_id: v for v in (NodeView("n1", "h1", 0, reads=5),
                                    NodeView("n2", "h2", 0, reads=1),
                                    NodeView("n3", "h3", 0, reads=0, draining=True))}
    assert [choose_replica(reps, by_id, host) for host in ("h1", "x")] == [
        reps[0], reps[1]]  # same host beats load; not draining beats fewer reads
    assert choose_replica(reps, {}, "x") is None


def lapse_leases(m: Master, clock: Clock) -> None:
    """Past every reader's lease (lease_ms 1000), every node still heartbeating; then a reap
    frees the slots the leases kept."""
    clock.t += 1.5
    for n in ("n1", "n2", "n3"):
        m.heartbeat(n, m.node(n).epoch)
    m.reap()


def used(m: Master) -> dict[str, int]:
    return {n.node.node_id: n.used_bytes for n in m.status().nodes}


def test_reads_same_host_first_else_spread_and_leases_per_replica() -> None:
    m, clock = pool()
    put(m, "k", "h1", 2)  # n1, n2
    assert [x.node_id if x else "" for x in m.get_replicas(["k"] * 3, "h2")] == ["n2"] * 3
    assert m.match_prefix(["k"], "h1")[0].node_id == "n1"
    # Another host: the replica whose node handed out the fewest locations (n1 1, n2 3).
    # Handed out before each: n1/n2 = 1/3, 2/3, 3/3 (a tie: by id), 4/3, 4/4.
    assert [reader_gets(m, "k", "x") for _ in range(5)] == ["n1", "n1", "n1", "n2", "n1"]
    clock.t += 2  # every lease ran out
    m.get_replicas(["k"], "h2")  # a reader holds n2's replica only
    assert m.remove(["k"]) == 1 and m.exists(["k"]) == [False]
    # n1's slot is free at once; n2's stays taken until its reader's lease ends.
    assert used(m) == {"n1": 0, "n2": 4 * KIB, "n3": 0}
    lapse_leases(m, clock)
    assert used(m) == {"n1": 0, "n2": 0, "n3": 0}


def test_a_put_seals_all_its_replicas_at_once_and_a_failed_replica_is_aborted_alone() -> None:
    m, _ = pool()
    (g,) = m.put_start(["k"], [100], "h1", 3)
    assert g.grant is not None and where(g) == ["n1", "n2", "n3"]
    token = g.grant.token
    assert m.exists(["k"]) == [False] and m.get_replicas(["k"]) == [None]
    # The writer could not reach n2: that replica goes, the put lives on in the others.
    assert m.put_abort([("k", token, "n2")]) == 1
    assert m.exists(["k"]) == [False]  # still pending
    assert m.put_end([("k", token + 1)]) == [False]  # not its token
    assert m.put_end([("k", token)]) == [True]
    assert holders(m, "k") == ["n1", "n3"]
    assert used(m) == {"n1": 4 * KIB, "n2": 0, "n3": 4 * KIB}
    assert m.put_end([("k", token)]) == [True]  # a harmless repeat
    s = m.stats()
    assert (s.puts_started, s.puts_aborted, m.status().puts) == (1, 0, 1)
    # Every replica aborted: the put is gone and counted as aborted once.
    (h,) = m.put_start(["j"], [100], "h1", 2)
    assert h.grant is not None
    assert m.put_abort([("j", h.grant.token, "n1"), ("j", h.grant.token, "n2")]) == 2
    assert m.list_objects("j")[0] == [] and m.stats().puts_aborted == 1


def test_eviction_and_a_dropped_node_take_one_replica_the_key_goes_with_the_last() -> None:
    m, clock = pool()
    put(m, "k", "h1", 2)  # n1, n2
    put(m, "only", "h1", 1)  # n1
    assert m.evict(prefix="only") == (1, 4 * KIB)
    clock.t += 4  # n1 stops heartbeating; the others go on
    for n in ("n2", "n3"):
        m.heartbeat(n, m.node(n).epoch)
    m.reap()
    assert [n.node.node_id for n in m.status().nodes] == ["n2", "n3"]
    assert holders(m, "k") == ["n2"]
    assert reader_gets(m, "k", "h1") == "n2"
    clock.t += 2
    assert m.evict(nbytes=1) == (1, 4 * KIB)  # the last replica: the key is gone
    assert m.exists(["k"]) == [False] and m.status().objects == 0


def test_memory_master_restarted_adopts_each_nodes_copy_as_a_replica() -> None:
    m, _ = pool()
    put(m, "k", "h1", 2)
    offsets = {meta.node_id: meta.offset for meta, _ in m.list_objects("k")[0]}
    fresh = Master(MasterConfig(), clock=Clock())  # a restarted master: empty memory
    for info in (node("n1", "h1", 4 * MIB), node("n2", "h2", 8 * MIB)):
        reg = fresh.register_node(info, [HeldObject("k", offsets[info.node_id], 100)])
        assert reg.adopted == 1
    assert holders(fresh, "k") == ["n1", "n2"]
    assert fresh.get_replicas(["k"], "h2")[0] is not None
    assert [x.offset for x in fresh.get_replicas(["k"], "h2") if x] == [offsets["n2"]]


def test_redis_records_replicas_and_a_new_master_recovers_them(redis_url: str) -> None:
    m, _ = pool(metadata=redis_url)
    put(m, "a", "h1", 2)
    put(m, "b", "h3", 3)
    (p,) = m.put_start(["p"], [100], "h2", 2)  # never sealed: reclaimed by the next master
    before = {meta.key + "@" + meta.node_id: meta.offset for meta, _ in m.list_objects()[0]}
    # The old master dies here without a word (no close).
    new = Master(MasterConfig(metadata=redis_url, replicas=2), clock=Clock())
    assert holders(new, "a") == ["n1", "n2"] and holders(new, "b") == ["n3", "n2", "n1"]
    assert holders(new, "p") == []
    after = {meta.key + "@" + meta.node_id: meta.offset for meta, _ in new.list_objects()[0]}
    assert after == {k: v for k, v in before.items() if not k.startswith("p@")}
    s = new.stats()
    assert (s.objects_recovered, s.puts_expired) == (2, 1)
    assert used(new) == {"n1": 8 * KIB, "n2": 8 * KIB, "n3": 4 * KIB}
    assert [x.node_id for x in new.get_replicas(["a", "b"], "h3") if x] == ["n1", "n3"]
    m.close()
    new.close()


@pytest.fixture
def two_node_processes(tmp_path: Path) -> Iterator[ProcessPool]:
    """A master and two `kvstore node` processes (hosts a and b), node timeout 1 s."""
    with two_node_pool(tmp_path, "rep", node_timeout_s=1) as pool:
        yield pool


@pytest.mark.slow
def test_node_sigkilled_every_object_reads_from_its_other_replica(
        two_node_processes: ProcessPool) -> None:
    address, ids, procs = two_node_processes
    # A third host's client: it reads over TCP from whichever replica it is handed.
    with KVStoreClient(address, host_id="host-c", config=ClientConfig(rpc_timeout_s=2.0)) as c:
        wait_for(lambda: len(c.status().nodes) == 2, what="both nodes registered")
        objects = {f"obj-{i}": os.urandom(500 + 41 * i) for i in range(30)}
        assert c.put_many(list(objects.items())) == [True] * 30  # the pool's default: 2
        assert c.put_many([("single", b"s" * 100)], replicas=1) == [True]
        listed, _ = c.list_objects(limit=1000)
        assert sorted((o.location.key, o.location.node_id) for o in listed
                      if o.location.key != "single") == sorted(
            (k, n) for k in objects for n in ids)
        (single,) = [o.location.node_id for o in listed if o.location.key == "single"]
        victim = procs[1 + ids.index(single)]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for(lambda: [n.node.node_id for n in c.status().nodes] == [
            i for i in ids if i != single], what="the killed node dropped")
        assert c.get_many(list(objects)) == list(objects.values())
        assert c.get_many(["single"]) == [None]
        assert c.status().objects == 30
        # One node left: a put of 2 replicas stores the one there is room for, not an error.
        assert c.put_many([("late", b"l" * 100)]) == [True]
        assert [o.location.node_id for o in c.list_objects("late")[0]] == [
            i for i in ids if i != single]
        assert c.get_many(["late"]) == [b"l" * 100]
