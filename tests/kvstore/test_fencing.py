"""Fenced metadata commits on a real redis-server: a master whose leader lease another master
took cannot land one more write in Redis, and stands by at once."""

from __future__ import annotations

import json

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kv_helpers import wait_for

from kvstore.config import MasterConfig
from kvstore.errors import NotLeaderError
from kvstore.leader import LEASE_KEY
from kvstore.master import Master, PutOutcome
from kvstore.master_service import NOT_LEADER, SERVICE_NAME, start_master
from kvstore.metadata import NodeInfo
from kvstore.redis_metadata import NODES, OBJECTS, RedisBackend
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

MIB = 1 << 20
NODE = NodeInfo("n0", "host-a", "127.0.0.1:1", "/dev/shm/none", 1 * MIB, "", 0)
OURS, THEIRS = "master-a 127.0.0.1:1", "master-b 127.0.0.1:2"


def _hashes(r: redis.Redis) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    return r.hgetall(OBJECTS), r.hgetall(NODES)  # type: ignore[return-value]


def test_a_commit_lands_only_while_the_lease_holds_the_masters_value(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as r:
        r.set(LEASE_KEY, OURS)
        backend = RedisBackend(redis_url, fence=(LEASE_KEY, OURS))
        master = Master(MasterConfig(metadata=redis_url), backend=backend)
        master.register_node(NODE)
        (grant,) = master.put_start(["a"], [100])
        assert grant.outcome is PutOutcome.ALLOCATED and grant.grant is not None
        before = _hashes(r)
        (state,) = json.loads(before[0][b"a"])
        assert (state[0], state[4]) == ("n0", "pending")

        r.set(LEASE_KEY, THEIRS)  # another master took the lease while this one went on
        with pytest.raises(NotLeaderError, match="no longer this master's"):
            master.put_end([("a", grant.grant.token, "n0")])
        assert _hashes(r) == before  # the seal never landed
        # Deposed for good: not even a whole rewrite after the lease comes back lands.
        r.set(LEASE_KEY, OURS)
        with pytest.raises(NotLeaderError, match="deposed"):
            master.remove(["a"])
        assert _hashes(r) == before
        assert (backend.deposed, backend.refused_commits) == (True, 1)
        backend.close()  # logs, writes nothing, raises nothing
        assert _hashes(r) == before


def test_a_lapsed_lease_refuses_the_commit_too(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as r:
        r.set(LEASE_KEY, OURS)
        backend = RedisBackend(redis_url, fence=(LEASE_KEY, OURS))
        master = Master(MasterConfig(metadata=redis_url), backend=backend)
        r.delete(LEASE_KEY)  # expired, nobody took it yet
        with pytest.raises(NotLeaderError):
            master.register_node(NODE)
        assert _hashes(r) == ({}, {})
        # Unfenced (a single master): the same write lands.
        solo = Master(MasterConfig(metadata=redis_url), backend=RedisBackend(redis_url))
        solo.register_node(NODE)
        assert list(_hashes(r)[1]) == [b"n0"]
        solo.close()


def test_a_leader_whose_lease_was_taken_mid_call_refuses_the_call_and_stands_by(
        redis_url: str) -> None:
    # A renewal every 3 s: the leader still believes it leads when the lease is taken from it,
    # as a leader paused past its lease margin does when it wakes.
    cfg = MasterConfig(metadata=redis_url, lease_ttl_s=9.0, lease_renew_s=3.0,
                       reap_interval_s=0.1)
    srv = start_master(cfg)
    try:
        wait_for(srv.leading, what="leading")
        assert srv.servicer.leadership is not None
        value = srv.servicer.leadership.lease.value
        with redis.Redis.from_url(redis_url) as r, \
                grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(
                service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING,
                what="KVMaster SERVING on the leader")
            assert r.get(LEASE_KEY) == value.encode()
            before = _hashes(r)
            r.set(LEASE_KEY, THEIRS, px=9000)
            assert srv.leading()  # it has not noticed: only the fence stands in the way
            stub = pb_grpc.KVMasterStub(ch)
            node = pb.NodeInfo(node_id="n0", host_id="h", address="127.0.0.1:1",
                               segment_path="/dev/shm/none", segment_size=MIB)
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterNode(pb.RegisterNodeRequest(node=node), timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert err.value.details().startswith(f"{NOT_LEADER}: ")
            assert _hashes(r) == before
            # Stood by at once, not at its next renewal 3 s on.
            assert not srv.leading()
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status \
                == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status \
                == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Status(pb.StatusRequest(), timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert r.get(LEASE_KEY) == THEIRS.encode()  # its lease is not touched either
    finally:
        srv.stop(grace=0)
