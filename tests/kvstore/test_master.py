"""Master domain logic with a fake clock: exact offsets, LRU eviction order, leases, timeouts."""

from __future__ import annotations

import pytest
from kv_helpers import Clock

from kvstore.config import KIB, MIB, MasterConfig
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo
from kvstore.slab_allocator import ClassStats
from pantry.common.errors import ConfigError


def make_master(capacity: int = 64 * KIB, **cfg: float) -> tuple[Master, Clock]:
    clock = Clock()
    settings: dict[str, float] = {"lease_ms": 1000, "put_timeout_s": 5, "node_timeout_s": 3,
                                  "max_object_bytes": 32 * KIB, **cfg}
    conf = MasterConfig(**settings)  # type: ignore[arg-type]
    m = Master(conf, clock=clock)
    m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", capacity))
    return m, clock


def put(m: Master, key: str, size: int = 4 * KIB, host: str = "h1") -> int:
    (grant,) = m.put_start([key], [size], host)
    assert grant.outcome is PutOutcome.ALLOCATED, grant
    assert grant.location is not None
    assert m.put_end([(key, grant.location.token)]) == [True]
    return grant.location.offset


def test_two_phase_put_visibility_and_duplicates() -> None:
    m, _ = make_master()
    (g,) = m.put_start(["a"], [100], "h1")
    assert g.outcome is PutOutcome.ALLOCATED and g.location is not None
    assert (g.location.offset, g.location.length, g.location.slot_bytes) == (0, 100, 4 * KIB)
    assert m.exists(["a"]) == [False]
    assert m.get_replicas(["a"]) == [None]
    assert m.match_prefix(["a"]) == []
    assert m.put_start(["a"], [100], "h1")[0].outcome is PutOutcome.IN_PROGRESS
    assert m.put_end([("a", g.location.token)]) == [True]
    assert m.exists(["a"]) == [True]
    assert m.put_start(["a"], [100], "h1")[0].outcome is PutOutcome.EXISTS
    assert m.put_start(["big"], [32 * KIB + 1], "h1")[0].outcome is PutOutcome.TOO_LARGE
    assert m.put_end([("never", 1)]) == [False]


def test_lru_eviction_order_and_leases_on_allocation_failure() -> None:
    m, _ = make_master(capacity=16 * KIB, high_watermark=1.0, low_watermark=1.0)
    assert [put(m, k) for k in "abcd"] == [0, 4 * KIB, 8 * KIB, 12 * KIB]
    m.get_replicas(["a"])  # touch + lease: a is now most recent and protected
    # Full: the next put evicts the LRU unleased object, b, and reuses its slot.
    assert put(m, "e") == 4 * KIB
    assert m.exists(list("abcde")) == [True, False, True, True, True]
    assert put(m, "f") == 8 * KIB  # then c
    assert m.exists(list("abcdef")) == [True, False, False, True, True, True]
    assert m.evictions == 2


def test_leased_objects_survive_and_no_space_is_reported() -> None:
    m, clock = make_master(capacity=8 * KIB, high_watermark=1.0, low_watermark=1.0)
    put(m, "a")
    put(m, "b")
    assert len(m.match_prefix(["a", "b"])) == 2  # leases both
    assert m.put_start(["c"], [4 * KIB], "h1")[0].outcome is PutOutcome.NO_SPACE
    clock.t += 1.5  # leases ran out
    assert put(m, "c") == 0  # a was least recently used (match touched a then b)
    assert m.exists(["a", "b", "c"]) == [False, True, True]


def test_watermark_eviction_down_to_low() -> None:
    m, _ = make_master(capacity=40 * KIB, high_watermark=0.5, low_watermark=0.25)
    # 40 KiB = 32 KiB block + 8 KiB block; 5 puts reach 20 KiB = 50% (not above high).
    for k in "abcde":
        put(m, k)
    assert m.evictions == 0
    put(m, "f")  # 24 KiB > 50%: evict LRU a, b, c, d... until used <= 10 KiB
    assert m.exists(list("abcdef")) == [False, False, False, False, True, True]
    assert m.status().used_bytes == 8 * KIB


def test_abandoned_put_reclaimed_and_node_timeout() -> None:
    m, clock = make_master()
    (p,) = m.put_start(["p"], [10], "h1")
    assert p.location is not None
    epoch = m.node("n1").epoch
    put(m, "s")
    clock.t += 2
    assert m.heartbeat("n1", epoch)
    m.reap()
    assert m.status().objects == 2
    clock.t += 4  # put_timeout 5 s passed; heartbeat 4 s ago > node_timeout 3 s
    m.heartbeat("n1", epoch)
    m.reap()
    assert m.status().objects == 1 and m.put_end([("p", p.location.token)]) == [False]
    clock.t += 4
    m.reap()
    assert m.status().nodes == () and m.exists(["s"]) == [False]
    assert not m.heartbeat("n1", epoch)


def test_remove_of_leased_object_defers_slot_reuse() -> None:
    m, clock = make_master(capacity=4 * KIB)
    put(m, "a")
    m.get_replicas(["a"])
    assert m.remove(["a", "zz"]) == 1
    assert m.exists(["a"]) == [False]
    # The slot is still held for the reader's lease.
    assert m.put_start(["b"], [10], "h1")[0].outcome is PutOutcome.NO_SPACE
    clock.t += 1.5
    m.reap()
    assert put(m, "b") == 0


def test_placement_prefers_writer_host_then_free_space() -> None:
    m, _ = make_master(capacity=16 * KIB)
    m.register_node(NodeInfo("n2", "h2", "127.0.0.1:2", "/dev/shm/y", 32 * KIB))
    (g,) = m.put_start(["x"], [10], "h1")
    assert g.location is not None and g.location.node_id == "n1"
    (g,) = m.put_start(["y"], [10], "elsewhere")
    assert g.location is not None and g.location.node_id == "n2"  # most free bytes


def test_config_validation_names_setting() -> None:
    with pytest.raises(ConfigError, match="low_watermark"):
        MasterConfig(high_watermark=0.5, low_watermark=0.8)
    with pytest.raises(ConfigError, match="put_timeout_s"):
        MasterConfig(put_timeout_s=0)
    with pytest.raises(ConfigError, match="min_slot_bytes"):
        MasterConfig(min_slot_bytes=3000)
    with pytest.raises(ConfigError, match="slab_page_bytes must be a positive multiple of 4096"):
        MasterConfig(slab_page_bytes=5000)
    with pytest.raises(ConfigError, match="slab_classes"):
        MasterConfig(slab_classes=0)


def test_slab_flags_reach_each_nodes_allocator() -> None:
    m = Master(MasterConfig(slab_page_bytes=64 * KIB, slab_classes=1), clock=Clock())
    m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 1 * MIB))
    for key, size in (("a", 30_000), ("b", 10_000)):
        (g,) = m.put_start([key], [size], "h1")
        assert g.location is not None
    # One class at most: b takes a's class (30,000 rounded up to a 256-byte granule), two
    # slots to a 64 KiB page.
    assert m.slab_classes() == {"n1": [ClassStats(30_208, 1, 2, 2)]}


def test_stats_count_every_put_outcome_prefix_match_and_lease() -> None:
    m, clock = make_master()
    put(m, "a")
    put(m, "b")
    c, _ = m.put_start(["c", "d"], [10, 10], "h1")
    assert c.location is not None
    assert m.put_abort([("c", c.location.token + 1)]) == 0  # not c's token
    assert m.put_abort([("c", c.location.token), ("a", 1)]) == 1  # a is sealed: not abortable
    assert [x.key for x in m.match_prefix(["a", "b", "zz", "a"])] == ["a", "b"]
    assert m.match_prefix(["zz"]) == []
    s = m.stats()
    assert (s.puts_started, s.puts_aborted, s.puts_expired) == (4, 1, 0)
    assert (s.match_prefix_calls, s.blocks_matched, s.active_leases) == (2, 2, 2)
    assert m.status().puts == 2
    clock.t += 6  # d's put_timeout (5 s) and both leases (1 s) ran out
    m.heartbeat("n1", m.node("n1").epoch)
    m.reap()
    s = m.stats()
    assert (s.puts_started, s.puts_aborted, s.puts_expired, s.active_leases) == (4, 1, 1, 0)


def test_finding2_a_put_is_sealed_only_with_its_own_token() -> None:
    m, clock = make_master()
    (first,) = m.put_start(["k"], [100], "h1")
    assert first.location is not None and first.grant is not None
    assert first.grant.token == first.location.token
    clock.t += 6  # the first writer stalls past put_timeout: its put is reclaimed
    m.heartbeat("n1", m.node("n1").epoch)
    m.reap()
    (second,) = m.put_start(["k"], [100], "h1")
    assert second.location is not None
    assert second.location.offset == first.location.offset  # the same slot, reassigned
    # The stale writer cannot seal (or abort) the second writer's pending put...
    assert m.put_end([("k", first.location.token)]) == [False]
    assert m.put_abort([("k", first.location.token)]) == 0
    assert m.exists(["k"]) == [False]
    # ...only its holder can; sealing again with the same token is a harmless repeat.
    assert m.put_end([("k", second.location.token)]) == [True]
    assert m.put_end([("k", second.location.token)]) == [True]
    assert m.put_end([("k", first.location.token)]) == [False]
    assert m.stats().puts_expired == 1 and m.status().puts == 1


def test_every_registration_is_a_new_epoch() -> None:
    m, _ = make_master()
    e1 = m.node("n1").epoch
    put(m, "a")
    (loc,) = m.match_prefix(["a"])
    assert loc.epoch == e1
    reg = m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 64 * KIB))
    assert reg.epoch > e1 and m.node("n1").epoch == reg.epoch and len(reg.grant_key) == 32
    assert not m.heartbeat("n1", e1)  # the old registration is told to register again
    assert m.heartbeat("n1", reg.epoch)
    assert m.exists(["a"]) == [False]
    (g,) = m.put_start(["b"], [100], "h1")
    assert g.location is not None and g.grant is not None
    assert (g.location.offset, g.location.epoch, g.grant.epoch) == (0, reg.epoch, reg.epoch)


def test_finding3_a_put_evicts_only_the_block_it_needs() -> None:
    # 8 MiB of 4 KiB objects, one leased in every MiB: no 1 MiB block can be freed.
    m, clock = make_master(capacity=8 * MIB, high_watermark=1.0, low_watermark=1.0,
                           max_object_bytes=1 * MIB)
    keys = [f"o{i}" for i in range(2048)]
    assert [put(m, k) for k in keys[:3]] == [0, 4 * KIB, 8 * KIB]
    for k in keys[3:]:
        put(m, k)
    leased = [keys[256 * i + 7] for i in range(8)]
    assert len(m.get_replicas(leased)) == 8
    assert m.put_start(["big"], [1 * MIB], "h1")[0].outcome is PutOutcome.NO_SPACE
    assert m.evictions == 0 and m.status().objects == 2048  # nothing evicted in vain
    # Once one MiB's lease is over, the put evicts exactly that MiB's 256 objects.
    clock.t += 1.5
    assert len(m.get_replicas(leased[:3] + leased[4:])) == 7
    assert put(m, "big", 1 * MIB) == 3 * MIB
    assert m.evictions == 256 and m.status().objects == 2048 - 256 + 1
    assert m.exists(keys[3 * 256 : 4 * 256]) == [False] * 256
    assert all(m.exists(keys[: 3 * 256] + keys[4 * 256 :]))
