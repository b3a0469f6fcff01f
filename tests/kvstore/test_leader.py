"""The leader lease on a real redis-server, and masters that share one Redis: one serves, the
other answers UNAVAILABLE naming it, a leader that loses Redis stops serving in time; only the
leader's KVMaster health is SERVING, and `kvstore status` says which master leads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kv_helpers import RedisServer, sample, scrape, wait_for

from kvstore.cli import main as kv_main
from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig, master_addresses
from kvstore.leader import LEASE_KEY, LeaderLease, Leadership
from kvstore.master_link import MasterLink, leader_named
from kvstore.master_service import SERVICE_NAME, start_master
from pantry.common.errors import ConfigError
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc


def test_the_lease_is_taken_once_and_only_its_holder_renews_or_releases(redis_url: str) -> None:
    a = LeaderLease(redis_url, "a", "127.0.0.1:1", ttl_s=0.5, timeout_s=1.0)
    b = LeaderLease(redis_url, "b", "127.0.0.1:2", ttl_s=0.5, timeout_s=1.0)
    try:
        assert (a.acquire(), b.acquire(), b.renew(), b.release()) == (True, False, False, False)
        assert (a.holder_address(), b.holder_address()) == ("127.0.0.1:1", "127.0.0.1:1")
        assert a.renew() is True
        with redis.Redis.from_url(redis_url) as r:
            assert 400 < r.pttl(LEASE_KEY) <= 500
        time.sleep(0.6)  # lapses: b takes it, a can no longer renew it
        assert (a.holder_address(), b.acquire(), a.renew()) == (None, True, False)
        assert (a.release(), b.release(), a.holder_address()) == (False, True, None)
    finally:
        a.close()
        b.close()


def test_master_addresses_are_parsed_in_one_place() -> None:
    assert master_addresses("h:1") == ("h:1",)
    assert master_addresses("h:1, 10.0.0.2:2") == ("h:1", "10.0.0.2:2")
    for bad in ("h", "h:1,", "h:x", ":1"):
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            master_addresses(bad)
    assert leader_named("standby; leader is 127.0.0.1:5005") == "127.0.0.1:5005"
    assert leader_named("standby; no leader yet (the lease is being taken over)") is None


def test_lease_flags_are_checked() -> None:
    with pytest.raises(ConfigError, match="at most a third of lease_ttl_s"):
        MasterConfig(lease_ttl_s=2.0, lease_renew_s=1.0)


def _config(url: str) -> MasterConfig:
    return MasterConfig(metadata=url, lease_ttl_s=0.9, lease_renew_s=0.3, reap_interval_s=0.1)


def test_a_standby_answers_unavailable_naming_the_leader_and_takes_over(redis_url: str) -> None:
    first = start_master(_config(redis_url))
    wait_for(first.leading, what="first master leading")
    second = start_master(_config(redis_url))
    leader = f"127.0.0.1:{first.port}"
    link = MasterLink(f"127.0.0.1:{second.port},{leader}", "", failover_s=10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as ch:
            wait_for(lambda: second.servicer.leadership is not None
                     and second.servicer.leadership.leader_address() == leader,
                     what="standby sees the leader")
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.KVMasterStub(ch).Status(pb.StatusRequest(), timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == f"standby; leader is {leader}"
        # The link starts at the standby and moves to the leader it names.
        stub = pb_grpc.KVMasterStub(link)
        assert stub.Exists(pb.KeysRequest(keys=["k"]), timeout=5).exists == [False]
        assert (link.current, link.failovers) == (leader, 1)
        assert not second.leading()

        first.stop(grace=0)  # releases the lease: the standby takes over at once
        t0 = time.monotonic()
        assert stub.Exists(pb.KeysRequest(keys=["k"]), timeout=5).exists == [False]
        print(f"\ntakeover after a released lease: {time.monotonic() - t0:.3f} s")
        assert second.leading() and link.current == f"127.0.0.1:{second.port}"
    finally:
        link.close()
        second.stop(grace=0)
        first.stop(grace=0)


def test_a_leader_whose_redis_goes_away_steps_down_before_its_lease_lapses(
        tmp_path: Path) -> None:
    own = RedisServer(tmp_path)  # this test kills its redis-server: not the shared one
    srv = start_master(_config(own.url(0)))
    try:
        wait_for(srv.leading, what="leading")
        leadership = srv.servicer.leadership
        assert leadership is not None
        own.stop()
        lost = time.monotonic()
        wait_for(lambda: not srv.leading(), timeout=5, what="stepped down")
        stepped = time.monotonic() - lost
        # Serving stops TTL - margin after the last renewal, which was before the loss (the
        # lease itself lives a full TTL from it); 0.1 s for this loop's polling.
        assert stepped < leadership.ttl_s - leadership.margin_s + 0.1
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.KVMasterStub(ch).Status(pb.StatusRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("standby; ")
        own.start()  # an empty Redis again: the master takes the lease back and serves
        wait_for(srv.leading, timeout=10, what="leading again")
        assert srv.master.status().objects == 0
    finally:
        srv.stop(grace=0)
        own.stop()


def test_leadership_never_serves_past_its_deadline_when_the_thread_stalls(
        redis_url: str) -> None:
    now = [100.0]
    lease = LeaderLease(redis_url, "solo", "127.0.0.1:9", ttl_s=3.0, timeout_s=1.0)
    elected: list[bool] = []
    ld = Leadership(lease, 3.0, 1.0, lambda: elected.append(True), lambda: None,
                    clock=lambda: now[0])
    try:
        # One round of the loop by hand: acquire, elect, renew at t=100.
        assert ld._try(lease.acquire) is True
        ld._deadline = 0.0
        assert not ld.leading()
        assert ld._try(lease.renew) is True
        assert ld.leading() and ld._deadline == 100.0 + 3.0 - 0.5
        now[0] = 102.49
        assert ld.leading()
        now[0] = 102.5  # no renewal since: stops serving half a renewal before the TTL
        assert not ld.leading()
    finally:
        lease.release()
        lease.close()


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_only_the_leader_is_serving_kvmaster_and_status_names_it(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    first = start_master(_config(redis_url))
    wait_for(first.leading, what="first master leading")
    second = start_master(_config(redis_url))
    a, b = f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"
    try:
        wait_for(lambda: _health(first.port, SERVICE_NAME) == serving, what="leader SERVING")
        # The standby is alive ("" SERVING, for liveness probes) but does not serve the pool.
        assert (_health(second.port, SERVICE_NAME), _health(second.port, ""),
                _health(first.port, "")) == (not_serving, serving, serving)
        assert (sample(scrape(first.metrics.url), "pantry_kv_master_leader"),
                sample(scrape(second.metrics.url), "pantry_kv_master_leader")) == (1.0, 0.0)
        # A standby exports none of the pool's figures (its copy would be stale).
        assert ("pantry_kv_master_objects", ()) not in scrape(second.metrics.url)

        assert kv_main(["status", "--master", f"{b},{a}", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["leader"], out["masters"]) == (a, [{"address": b, "role": "standby"},
                                                       {"address": a, "role": "leader"}])
        assert kv_main(["status", "--master", f"{a},{b}"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"leader {a}  masters {a} (leader), {b} (standby)")

        first.stop(grace=0)  # the standby takes over: health and the gauge follow
        wait_for(lambda: _health(second.port, SERVICE_NAME) == serving, what="took over")
        assert sample(scrape(second.metrics.url), "pantry_kv_master_leader") == 1.0
        with KVStoreClient(f"{a},{b}", token="") as c:
            s = c.status()
        assert (s.leader, s.role) == (b, "leader")
        assert kv_main(["status", "--master", f"{a},{b}", "--json", "--timeout", "2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["masters"] == [{"address": a, "role": "unreachable"},
                                  {"address": b, "role": "leader"}]
    finally:
        second.stop(grace=0)
        first.stop(grace=0)
