"""The master's side of the SSD tier, with a fake clock: which objects spill and get promoted,
and what each report from a node does to the records."""

from __future__ import annotations

from kv_helpers import Clock

from kvstore.config import KIB, MasterConfig
from kvstore.master import Master, PutOutcome
from kvstore.metadata import DRAM, SSD, HeldObject, NodeInfo
from kvstore.tiering import SpillCandidate, TierDone, TierOp, TierOrder, spill_candidates


def make_master(**cfg: float) -> tuple[Master, int]:
    settings: dict[str, float] = {"lease_ms": 1000, "put_timeout_s": 5, "node_timeout_s": 3,
                                  "max_object_bytes": 32 * KIB, "spill_watermark": 0.01,
                                  "promote_after_hits": 2, "tier_orders": 3, **cfg}
    m = Master(MasterConfig(**settings), clock=Clock())  # type: ignore[arg-type]
    epoch = m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 256 * KIB,
                                     ssd_dir="/ssd", ssd_bytes=1 << 20)).epoch
    return m, epoch


def put(m: Master, key: str, size: int = 4 * KIB) -> tuple[int, int]:
    (grant,) = m.put_start([key], [size], "h1")
    assert grant.outcome is PutOutcome.ALLOCATED and grant.location is not None
    assert m.put_end([(key, grant.location.token)]) == [True]
    return grant.location.offset, grant.location.token


def replicas(m: Master, key: str) -> list[tuple[str, str]]:
    return [(meta.tier, "sealed" if meta.sealed else "pending")
            for meta, _ in m.list_objects(key)[0] if meta.key == key]


def test_spill_candidates_are_the_coldest_uncopied_up_to_the_cap() -> None:
    cands = [SpillCandidate(k, 0, 1, 1) for k in "abcde"]
    assert spill_candidates(cands, 50, 100, 0.5, 0, lambda k: False, 9) == []
    got = spill_candidates(cands, 51, 100, 0.5, 1, lambda k: k == "b", 4)
    assert [c.key for c in got] == ["a", "c", "d"]


def test_spills_are_ordered_lru_first_and_recorded_when_done() -> None:
    m, epoch = make_master()
    tokens = {k: put(m, k) for k in ("a", "b", "c", "d")}
    m.get_replicas(["a"])  # a becomes the most recently used
    orders = m.tier_heartbeat("n1", epoch)
    assert [(o.op, o.key) for o in orders] == [(TierOp.SPILL, "b"), (TierOp.SPILL, "c"),
                                               (TierOp.SPILL, "d")]
    assert orders[0] == TierOrder(TierOp.SPILL, "b", tokens["b"][0], 4 * KIB, tokens["b"][1])
    # Under way: not ordered again; the cap (3) leaves no room for a.
    assert m.tier_heartbeat("n1", epoch) == []
    done = [TierDone(TierOp.SPILL, o.key, o.token, True, o.length) for o in orders]
    done[2] = TierDone(TierOp.SPILL, "d", tokens["d"][1], False, 4 * KIB)  # refused: SSD full
    nxt = m.tier_heartbeat("n1", epoch, done)
    assert [(o.op, o.key) for o in nxt] == [(TierOp.SPILL, "a")]  # d is not asked again
    assert replicas(m, "b") == [(DRAM, "sealed"), (SSD, "sealed")]
    assert replicas(m, "d") == [(DRAM, "sealed")]
    (node,) = m.status().nodes
    assert (node.ssd_used_bytes, node.ssd_objects) == (8 * KIB, 2)
    # A DRAM replica is read before the SSD one.
    (loc,) = m.get_replicas(["b"])
    assert loc is not None and loc.tier == DRAM


def test_after_dram_eviction_reads_go_to_ssd_then_hot_objects_are_promoted() -> None:
    m, epoch = make_master()
    _, token = put(m, "a")
    (order,) = m.tier_heartbeat("n1", epoch)
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.SPILL, "a", token, True, 4 * KIB)])
    assert m.evict(nbytes=1) == (1, 4 * KIB)  # the DRAM replica only
    assert replicas(m, "a") == [(SSD, "sealed")]
    (loc,) = m.get_replicas(["a"])
    assert loc is not None and (loc.tier, loc.offset, loc.length) == (SSD, 0, 4 * KIB)
    assert m.tier_heartbeat("n1", epoch) == []  # one hit: not yet
    assert m.match_prefix(["a"])[0].tier == SSD
    (promote,) = m.tier_heartbeat("n1", epoch)
    assert (promote.op, promote.key, promote.length) == (TierOp.PROMOTE, "a", 4 * KIB)
    assert replicas(m, "a") == [(SSD, "sealed"), (DRAM, "pending")]
    (loc,) = m.get_replicas(["a"])
    assert loc is not None and loc.tier == SSD  # the pending slot is invisible
    seq = m.events.last_seq + 1
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.PROMOTE, "a", promote.token, True,
                                            4 * KIB)])
    assert replicas(m, "a") == [(SSD, "sealed"), (DRAM, "sealed")]
    assert [(e.kind.value, e.key, e.tier) for e in m.events.read(seq)[1]] == [
        ("stored", "a", DRAM)]
    (loc,) = m.get_replicas(["a"])
    assert loc is not None and (loc.tier, loc.offset) == (DRAM, promote.offset)


def test_a_spill_overtaken_by_dram_eviction_keeps_its_file() -> None:
    m, epoch = make_master()
    _, token_a = put(m, "a")
    _, token_b = put(m, "b")
    assert [o.key for o in m.tier_heartbeat("n1", epoch)] == ["a", "b"]
    assert m.evict(nbytes=8 * KIB) == (2, 8 * KIB)  # both DRAM replicas, copies under way
    seq = m.events.last_seq + 1
    orders = m.tier_heartbeat("n1", epoch, [
        TierDone(TierOp.SPILL, "a", token_a, True, 4 * KIB),
        TierDone(TierOp.SPILL, "b", token_b + 1, True, 4 * KIB)])  # not the evicted replica
    assert replicas(m, "a") == [(SSD, "sealed")]
    (loc,) = m.get_replicas(["a"])
    assert loc is not None and (loc.tier, loc.length) == (SSD, 4 * KIB)
    assert TierOrder(TierOp.DROP, "b") in orders and m.exists(["b"]) == [False]
    assert [(e.kind.value, e.key, e.tier) for e in m.events.read(seq)[1]] == [
        ("stored", "a", SSD)]


def test_a_put_that_evicts_a_spilling_object_keeps_its_copy() -> None:
    m, epoch = make_master(high_watermark=1.0, low_watermark=1.0)
    tokens = [put(m, f"k{i:02d}")[1] for i in range(64)]  # 256 KiB: the node is full
    assert [o.key for o in m.tier_heartbeat("n1", epoch)] == ["k00", "k01", "k02"]
    put(m, "new")  # evicts the coldest, k00, whose copy is under way
    assert m.exists(["k00", "k01"]) == [False, True]
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.SPILL, "k00", tokens[0], True, 4 * KIB)])
    assert replicas(m, "k00") == [(SSD, "sealed")]


def test_a_failed_promotion_frees_its_slot() -> None:
    m, epoch = make_master(promote_after_hits=1)
    _, token = put(m, "a")
    m.tier_heartbeat("n1", epoch)
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.SPILL, "a", token, True, 4 * KIB)])
    m.evict(nbytes=1)
    m.get_replicas(["a"])
    (promote,) = m.tier_heartbeat("n1", epoch)
    used = m.status().nodes[0].used_bytes
    assert used > 0
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.PROMOTE, "a", promote.token, False,
                                            4 * KIB)])
    assert replicas(m, "a") == [(SSD, "sealed")]
    assert m.status().nodes[0].used_bytes == 0


def test_stale_reports_dropped_files_and_removal() -> None:
    m, epoch = make_master()
    _, token = put(m, "a")
    _, token_b = put(m, "b")
    m.tier_heartbeat("n1", epoch)
    m.remove(["a"])  # gone before its spill is reported: the file must go too
    orders = m.tier_heartbeat("n1", epoch, [TierDone(TierOp.SPILL, "a", token, True, 4 * KIB),
                                            TierDone(TierOp.SPILL, "b", token_b, True,
                                                     4 * KIB)])
    assert TierOrder(TierOp.DROP, "a") in orders
    assert m.exists(["a"]) == [False]
    # The node lost b's file (its watermark, or damage): the replica goes, the DRAM one stays.
    seq = m.events.last_seq + 1
    m.tier_heartbeat("n1", epoch, dropped=["b", "a"])  # a's file was already let go of
    assert replicas(m, "b") == [(DRAM, "sealed")]
    assert [(e.kind.value, e.key, e.tier) for e in m.events.read(seq)[1]] == [
        ("evicted", "b", SSD)]
    # Removing a key with an SSD replica tells the node to delete the file.
    _, token_c = put(m, "c")
    m.tier_heartbeat("n1", epoch, [TierDone(TierOp.SPILL, "c", token_c, True, 4 * KIB)])
    assert replicas(m, "c") == [(DRAM, "sealed"), (SSD, "sealed")]
    assert m.remove(["c"]) == 1
    assert TierOrder(TierOp.DROP, "c") in m.tier_heartbeat("n1", epoch)
    assert m.tier_heartbeat("n1", epoch + 1) == []  # not the current registration


def test_registration_adopts_ssd_files_and_a_node_drop_forgets_them() -> None:
    m, _ = make_master()
    info = NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 256 * KIB, ssd_dir="/ssd",
                    ssd_bytes=1 << 20)
    reg = m.register_node(info, [HeldObject("x", 0, 5000, SSD), HeldObject("y", 0, 6000, SSD),
                                 HeldObject("bad key!", 0, 10, SSD)])
    assert reg.adopted == 2
    assert replicas(m, "x") == [(SSD, "sealed")]
    (loc,) = m.get_replicas(["y"])
    assert loc is not None and (loc.tier, loc.length, loc.epoch) == (SSD, 6000, reg.epoch)
    (node,) = m.status().nodes
    assert (node.ssd_used_bytes, node.ssd_objects, node.objects) == (11000, 2, 0)
    m.register_node(info)  # restarted with an empty directory
    assert m.exists(["x", "y"]) == [False, False]


def test_a_master_restarted_on_redis_keeps_ssd_replicas(redis_url: str) -> None:
    conf = MasterConfig(metadata=redis_url)
    m = Master(conf)
    info = NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 256 * KIB, ssd_dir="/ssd",
                    ssd_bytes=1 << 20)
    epoch = m.register_node(info, [HeldObject("x", 0, 5000, SSD)]).epoch
    m.close()
    again = Master(conf)
    (loc,) = again.get_replicas(["x"])
    assert loc is not None and (loc.tier, loc.length, loc.epoch) == (SSD, 5000, epoch)
    assert again.status().nodes[0].ssd_objects == 1
    again.remove(["x"])
    assert again.tier_heartbeat("n1", epoch) == [TierOrder(TierOp.DROP, "x")]
    again.close()
