"""KV events: the master's ring, and WatchEvents over a real gRPC master with a real node."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kv_helpers import wait_for

from kvstore.auth import UNAUTHENTICATED
from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.event_watch import EventWatcher
from kvstore.events import EventGap, EventKind, EventLog, PoolEvent
from kvstore.master import Master
from kvstore.master_service import MasterServer, start_master
from kvstore.metadata import NodeInfo
from kvstore.node_service import NodeServer
from pantry.common.config_flags import KIB
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

Seen = list[tuple[str, str, str]]


def test_the_ring_numbers_events_and_counts_what_it_dropped() -> None:
    log = EventLog(capacity=4, wall_clock=lambda: 7.0)
    for i in range(10):
        log.emit(EventKind.STORED, f"k{i}", "n1")
    assert log.last_seq == 10
    gap, events = log.read(2)
    assert gap == 5  # 2..6 are gone; 7 is the oldest kept
    assert events == [PoolEvent(s, EventKind.STORED, f"k{s - 1}", "n1", "dram", 7.0, log.run_id)
                      for s in (7, 8, 9, 10)]
    assert log.read(9, limit=1) == (0, events[2:3])
    assert log.read(11) == (0, [])
    assert log.wait(11, 0.01) is False
    threading.Timer(0.05, lambda: log.emit(EventKind.NODE_LEFT, node_id="n1")).start()
    assert log.wait(11, 5.0) is True
    assert log.read(11)[1][0].tier == ""  # node events name no tier


def _kinds(master: Master) -> Seen:
    return [(e.kind.value, e.key, e.node_id) for e in master.events.read(1)[1]]


def test_the_master_emits_stored_removed_and_evicted() -> None:
    # 64 KiB node, 16 KiB objects: the fourth put crosses the 90% watermark and evicts the
    # least recently used sealed object.
    m = Master()
    m.register_node(NodeInfo("n1", "h", "127.0.0.1:1", "", 64 * KIB))
    for i in range(4):
        (g,) = m.put_start([f"k{i}"], [16 * KIB])
        assert g.grant is not None
        assert m.put_end([(f"k{i}", g.grant.token)]) == [True]
    assert m.remove(["k1"]) == 1
    assert m.evict(prefix="k2") == (1, 16 * KIB)
    assert _kinds(m) == [("node_joined", "", "n1"),
                         ("stored", "k0", "n1"), ("stored", "k1", "n1"), ("stored", "k2", "n1"),
                         ("evicted", "k0", "n1"), ("stored", "k3", "n1"),
                         ("removed", "k1", "n1"), ("evicted", "k2", "n1")]
    assert [e.seq for e in m.events.read(1)[1]] == list(range(1, 9))


def _watch(watcher: EventWatcher, n: int, out: list[PoolEvent | EventGap]) -> threading.Thread:
    def run() -> None:
        for e in watcher:
            out.append(e)
            if sum(isinstance(x, PoolEvent) for x in out) >= n:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_watch_events_streams_resumes_and_reports_a_gap(
        master: MasterServer, master_address: str,
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    node = node_factory("ev")
    nid = node.node.config.node_id
    c = client_factory()
    live: list[PoolEvent | EventGap] = []
    watcher = EventWatcher(master_address, "", from_seq=0, prefix="a/")
    t = _watch(watcher, 3, live)
    try:
        # A watcher from now on sees only what happens after it is subscribed.
        wait_for(lambda: master.servicer.watchers == 1, what="watcher subscribed")
        assert c.put_many([("a/1", b"x" * 100), ("b/1", b"y" * 100), ("a/2", b"z")]) == [True] * 3
        assert c.remove(["a/1", "b/1"]) == 2
        t.join(timeout=10)
        assert [(e.kind.value, e.key, e.node_id, e.tier) for e in live
                if isinstance(e, PoolEvent)] == [("stored", "a/1", nid, "dram"),
                                                 ("stored", "a/2", nid, "dram"),
                                                 ("removed", "a/1", nid, "dram")]
    finally:
        watcher.close()
    all_events = master.master.events.read(1)[1]
    assert [(e.seq, e.kind.value, e.key) for e in all_events] == [
        (1, "node_joined", ""), (2, "stored", "a/1"), (3, "stored", "b/1"), (4, "stored", "a/2"),
        (5, "removed", "a/1"), (6, "removed", "b/1")]
    run_id = master.master.events.run_id

    # Resume from a sequence number of this run.
    got: list[PoolEvent | EventGap] = []
    resumed = EventWatcher(master_address, "", from_seq=4, run_id=run_id)
    t = _watch(resumed, 3, got)
    t.join(timeout=10)
    resumed.close()
    assert [(e.seq, e.key) for e in got if isinstance(e, PoolEvent)] == [
        (4, "a/2"), (5, "a/1"), (6, "b/1")]

    # Another run's numbers: the stream starts at this run's first event.
    other: list[PoolEvent | EventGap] = []
    w = EventWatcher(master_address, "", from_seq=5, run_id="another-run")
    t = _watch(w, 1, other)
    t.join(timeout=10)
    w.close()
    assert [(e.seq, e.kind.value) for e in other] == [(1, "node_joined")]

    # Fallen out of the ring: the first message says how many were lost.
    master.master.events = small = EventLog(capacity=2)
    for i in range(5):
        small.emit(EventKind.STORED, f"g{i}", nid)
    with grpc.insecure_channel(master_address) as ch:
        stream = pb_grpc.KVMasterStub(ch).WatchEvents(pb.WatchEventsRequest(from_seq=1),
                                                      timeout=5)
        first = [next(stream), next(stream), next(stream)]
        stream.cancel()
    assert [(m.gap, m.seq, m.key) for m in first] == [(3, 0, ""), (0, 4, "g3"), (0, 5, "g4")]


def test_watch_events_checks_its_input(master_address: str) -> None:
    with grpc.insecure_channel(master_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            next(pb_grpc.KVMasterStub(ch).WatchEvents(
                pb.WatchEventsRequest(prefix="p" * 10_000), timeout=5))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix: longer than a key" in (err.value.details() or "")


def test_the_token_interceptor_guards_the_stream_too(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    srv = start_master(MasterConfig(token_file=str(token_file)))
    address = f"127.0.0.1:{srv.port}"
    try:
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                next(pb_grpc.KVMasterStub(ch).WatchEvents(pb.WatchEventsRequest(), timeout=5))
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            # Health stays open for probes.
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        srv.master.events.emit(EventKind.NODE_JOINED, node_id="n9")
        got: list[PoolEvent | EventGap] = []
        w = EventWatcher(address, "tok-123", from_seq=1)
        t = _watch(w, 1, got)
        t.join(timeout=10)
        w.close()
        assert [(e.seq, e.kind, e.node_id) for e in got if isinstance(e, PoolEvent)] == [
            (1, EventKind.NODE_JOINED, "n9")]
    finally:
        srv.stop(grace=0)
