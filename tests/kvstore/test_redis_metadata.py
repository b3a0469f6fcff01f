"""Metadata in a real redis-server: records round-trip, a new master rebuilds from them, and
a redis-server restarted empty under a running master is rewritten from the master's view."""

from __future__ import annotations

import json

import redis
from kv_helpers import RedisServer, wait_for

from kvstore.config import MasterConfig
from kvstore.errors import MetadataUnavailableError
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo, NodeRecord, ObjectMeta, ObjectState, StoredObject
from kvstore.redis_metadata import NODES, OBJECTS, RedisBackend
from pantry.common.config_flags import KIB, MIB

NODE = NodeInfo("n0", "host-a", "127.0.0.1:1", "/dev/shm/none", 1 * MIB, "", 7)


def test_records_round_trip_through_redis(redis_url: str) -> None:
    a1 = ObjectMeta("a", "n0", 0, 100, 4096, ObjectState.SEALED, 0.0, 7, 11)
    a2 = ObjectMeta("a", "n1", 8192, 100, 4096, ObjectState.SEALED, 0.0, 3, 11)
    b = ObjectMeta("b", "n0", 4096, 200, 4096, ObjectState.PENDING, 123.0, 7, 12)
    first = RedisBackend(redis_url)
    first.put_node(NodeRecord(NODE, b"k" * 32))
    first.put(StoredObject("a", (a1, a2)))
    first.put(StoredObject("b", (b,)))
    assert not first.in_sync
    first.commit()
    assert first.in_sync
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        assert json.loads(r.hget(OBJECTS, "a") or "") == [
            ["n0", 0, 100, 4096, "sealed", 7, 11, "dram"],
            ["n1", 8192, 100, 4096, "sealed", 3, 11, "dram"]]
        # A record written before replicas existed: one flat replica, no tier.
        r.hset(OBJECTS, "old", json.dumps(["n0", 12288, 50, 4096, "sealed", 7, 13]))
    second = RedisBackend(redis_url)
    # The pending put's deadline is on the old master's clock: not kept.
    assert list(second.scan()) == [
        StoredObject("a", (a1, a2)),
        StoredObject("b", (ObjectMeta("b", "n0", 4096, 200, 4096, ObjectState.PENDING, 0.0, 7,
                                      12),)),
        StoredObject("old", (ObjectMeta("old", "n0", 12288, 50, 4096, ObjectState.SEALED, 0.0,
                                        7, 13),))]
    assert second.nodes() == [NodeRecord(NODE, b"k" * 32)]
    assert second.delete("a") == StoredObject("a", (a1, a2))
    second.delete("old")
    second.delete_node("n0")
    second.close()
    third = RedisBackend(redis_url)
    assert ([m.key for m in third.scan()], third.count(), third.nodes()) == (["b"], 1, [])
    for backend in (first, third):
        backend.close()


def test_an_unreachable_store_is_a_named_error() -> None:
    from kv_helpers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    try:
        RedisBackend(url, timeout_s=0.5)
    except MetadataUnavailableError as e:
        assert str(e).startswith(f"metadata store {url}: ")
    else:
        raise AssertionError("no error for a store nobody serves")


def test_a_new_master_rebuilds_from_redis_and_reclaims_pending_puts(redis_url: str) -> None:
    cfg = MasterConfig(metadata=redis_url, min_slot_bytes=4 * KIB)
    old = Master(cfg)
    reg = old.register_node(NODE)
    grants = old.put_start(["a", "b", "c"], [100, 5000, 100])
    assert [g.outcome for g in grants] == [PutOutcome.ALLOCATED] * 3
    # Slab pages: a's 4 KiB page gives its free tail to b's class, whose tail then holds c.
    assert [g.location.offset for g in grants if g.location] == [0, 4096, 12288]
    tickets = [(g.key, g.grant.token) for g in grants[:2] if g.grant]
    assert old.put_end(tickets) == [True, True]
    # The master dies here without a word (no close); c was never sealed.
    new = Master(cfg)
    status = new.status()
    assert (status.objects, status.used_bytes) == (2, 4096 + 5056)
    assert status.nodes[0].node.epoch == reg.epoch
    assert new.heartbeat("n0", reg.epoch)  # the node goes on in the same epoch
    assert (new.stats().objects_recovered, new.stats().puts_expired) == (2, 1)
    assert [m.offset if m else None for m in new.get_replicas(["a", "b", "c"])] == [0, 4096,
                                                                                   None]
    # c's slot is free again, and the next put takes it.
    (again,) = new.put_start(["d"], [100])
    assert again.location is not None and again.location.offset == 12288
    # Grants of the recovered epoch are signed with the key the node holds.
    assert again.grant is not None and again.grant.epoch == reg.epoch
    old.close()
    new.close()


def test_redis_restarted_empty_under_the_master_is_rewritten(
    redis_server: RedisServer, redis_url: str
) -> None:
    master = Master(MasterConfig(metadata=redis_url))
    master.register_node(NODE)
    (g,) = master.put_start(["a"], [100])
    assert g.grant is not None
    master.put_end([("a", g.grant.token)])
    redis_server.stop()
    # The master keeps serving from its own records while the store is gone.
    (h,) = master.put_start(["b"], [100])
    assert h.grant is not None
    assert master.put_end([("b", h.grant.token)]) == [True]
    assert master.exists(["a", "b"]) == [True, True]
    redis_server.start()  # no persistence: it comes back empty
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        assert r.hlen(OBJECTS) == 0

        def rewritten() -> bool:
            master.reap()
            return sorted(r.hkeys(OBJECTS)) == ["a", "b"] and r.hkeys(NODES) == ["n0"]

        wait_for(rewritten, what="the store rewritten from the master")
    rebuilt = Master(MasterConfig(metadata=redis_url))
    assert rebuilt.exists(["a", "b"]) == [True, True]
    master.close()
    rebuilt.close()
