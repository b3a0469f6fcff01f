"""Drain: the master stops placing on the node and swaps each moved replica in one step (the old
slot kept for its readers' leases); the client-side driver empties a live node while reader
threads read every key without one failure; `kvstore drain` and `kvstore status` on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import grpc
import pytest
from test_replicas import holders, lapse_leases, pool, put, reader_gets, used

from kvstore.cli import main as kvstore_main
from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.drain import drain_node
from kvstore.errors import UnknownNodeError
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo
from kvstore.node_service import NodeServer
from pantry.common.config_flags import KIB, MIB

NodeFactory = Callable[..., NodeServer]
ClientFactory = Callable[..., KVStoreClient]


def test_a_move_replaces_the_replica_in_one_step_and_keeps_the_old_slot_for_its_reader() -> None:
    m, clock = pool()  # n1 on h1 (4 MiB), n2 on h2 (8 MiB), n3 on h3 (6 MiB)
    put(m, "a", "h1")  # n1
    put(m, "b", "h1", 2)  # n1, n2
    state = m.drain("n1")
    assert (state.draining, state.keys, state.replicas, state.dropped) == (True, ("a", "b"), 2, 0)
    assert put(m, "new", "h1") == ["n2"]  # nothing new goes to a draining node
    assert reader_gets(m, "a", "h1") == "n1"  # a reader holds the old replica's slot
    grants = m.put_start(["a", "b", "zz"], [0, 0, 0], replace_node="n1")
    assert [g.outcome for g in grants] == [PutOutcome.ALLOCATED, PutOutcome.ALLOCATED,
                                           PutOutcome.GONE]
    # a: the emptiest node; b: the one that holds no replica of it yet.
    assert [g.location.node_id for g in grants[:2] if g.location] == ["n2", "n3"]
    # Until sealed, the moves are invisible and the old replicas serve.
    assert holders(m, "a") == ["n1", "n2"] and reader_gets(m, "a", "h2") == "n1"
    assert m.put_start(["a"], [0], replace_node="n1")[0].outcome is PutOutcome.IN_PROGRESS
    assert m.put_end([(g.key, g.grant.token) for g in grants[:2] if g.grant]) == [True, True]
    assert holders(m, "a") == ["n2"] and holders(m, "b") == ["n2", "n3"]
    assert reader_gets(m, "a", "h1") == "n2"
    # a's old slot stays taken until its reader's lease runs out; b's was free at once.
    assert used(m)["n1"] == 4 * KIB
    state = m.drain("n1")
    assert (state.keys, state.replicas) == ((), 0)
    lapse_leases(m, clock)
    assert used(m)["n1"] == 0
    assert [n.draining for n in m.status().nodes] == [True, False, False]
    assert not m.drain("n1", cancel=True).draining
    assert put(m, "back", "h1") == ["n1"]
    with pytest.raises(UnknownNodeError):
        m.drain("nope")


def test_no_room_anywhere_the_drain_drops_the_replica() -> None:
    m = Master(MasterConfig(high_watermark=1.0, low_watermark=1.0))
    m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/n1", 4 * MIB))
    m.register_node(NodeInfo("n2", "h2", "127.0.0.1:2", "/dev/shm/n2", 1 * MIB))
    for i in range(3):
        put(m, f"k{i}", "h1", size=400 * KIB)
    put(m, "full", "h2", size=1000 * KIB)  # n2 has no room left for any of them
    assert m.drain("n1").keys == ("k0", "k1", "k2")
    grants = m.put_start(["k0", "k1"], [0, 0], replace_node="n1")
    assert [g.outcome for g in grants] == [PutOutcome.NO_SPACE] * 2
    assert m.exists(["full"]) == [True]  # a move never evicts to make room
    state = m.drain("n1", drop=["k0", "k1"])
    assert (state.dropped, state.keys, state.replicas) == (2, ("k2",), 1)
    assert m.exists(["k0", "k1", "k2"]) == [False, False, True]


def test_drain_a_live_node_while_readers_read_every_key(
    node_factory: NodeFactory, client_factory: ClientFactory, master_address: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = node_factory("src", host_id="host-a")
    node_factory("dst1", host_id="host-b")
    node_factory("dst2", host_id="host-c")
    src_id = src.node.config.node_id
    writer = client_factory(host_id="host-a")
    # Three sizes: three slab classes, a page of each on every node.
    objects = {f"obj-{i:03d}": os.urandom((1000, 3000, 9000)[i % 3]) for i in range(120)}
    keys, values = list(objects), list(objects.values())
    assert writer.put_many(list(objects.items())) == [True] * 120
    assert {e.location.node_id for e in writer.list_objects(limit=1000)[0]} == {src_id}

    stop = threading.Event()
    reads = {"host-a": 0, "host-z": 0}
    bad: list[str] = []

    def reader(host: str) -> None:
        # host-a maps the source's segment (shm); host-z reads every node over TCP.
        c = client_factory(host_id=host)
        while not stop.is_set():
            try:
                got = c.get_many(keys)
            except grpc.RpcError as e:
                bad.append(f"{host}: {e}")
                continue
            bad.extend(f"{host}: {k}" for k, g, v in zip(keys, got, values, strict=True)
                       if g != v)
            reads[host] += 1

    threads = [threading.Thread(target=reader, args=(h,)) for h in reads]
    for t in threads:
        t.start()
    try:
        drainer = client_factory(host_id="host-d")
        before = dict(reads)
        report = drain_node(drainer, src_id, batch=16)
        during = {h: reads[h] - before[h] for h in reads}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    assert all(n > 0 for n in during.values()), during  # reads ran across the drain
    assert (report.moved, report.dropped) == (120, 0)
    listed = writer.list_objects(limit=1000)[0]
    assert len(listed) == 120 and src_id not in {e.location.node_id for e in listed}
    assert writer.get_many(keys) == values
    status = {n.node.node_id: n for n in writer.status().nodes}
    assert (status[src_id].objects, status[src_id].draining) == (0, True)
    assert writer.put_many([("after", b"x" * 100)]) == [True]  # host-a: not on the source
    assert [e.location.node_id for e in writer.list_objects("after")[0]] != [src_id]

    # The CLI: status names the draining node; draining it again finds nothing to move.
    capsys.readouterr()
    assert kvstore_main(["status", "--master", master_address]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if src_id in line]
    assert row.split()[-1] == "draining"
    assert kvstore_main(["drain", src_id, "--master", master_address]) == 0
    assert capsys.readouterr().out.startswith(f"drained {src_id} in ")
    assert kvstore_main(["drain", src_id, "--cancel", "--master", master_address]) == 0
    assert not {n.node.node_id: n for n in writer.status().nodes}[src_id].draining
    assert kvstore_main(["drain", "nope", "--master", master_address]) == 3
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_new_master_on_redis_keeps_draining_the_node(redis_url: str) -> None:
    m, _ = pool(metadata=redis_url)
    put(m, "a", "h1")
    assert m.drain("n1").keys == ("a",)
    new = Master(MasterConfig(metadata=redis_url))  # a standby taking over, or a restart
    assert [n.draining for n in new.status().nodes] == [True, False, False]
    assert put(new, "b", "h1") == ["n2"]
    assert new.drain("n1").keys == ("a",)
    new.drain("n1", cancel=True)
    assert [n.draining for n in Master(MasterConfig(metadata=redis_url)).status().nodes] == [
        False, False, False]
    m.close()
    new.close()
