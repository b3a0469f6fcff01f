"""Standby masters and object replicas as the chart renders them: a StatefulSet of masters behind
a headless Service, each advertising its own pod's DNS name, every client given all of them, and
two masters started from the rendered command lines on a real redis-server handing the pool over
when the leader stops."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import KVStoreClient
from kvstore.master_service import start_master
from kvstore.node_service import start_node
from tests.deploy.chart_commands import POD_ENV, config_of
from tests.deploy.chart_rig import (
    CASES,
    CHART,
    Manifest,
    by_kind_name,
    container,
    helm,
    parse_manifests,
    template,
    values_args,
)
from tests.deploy.conftest import Rendered
from tests.kvstore.kv_helpers import RedisServer, wait_for

PEERS = "t-pantry-kvstore-masters"
MASTERS = [f"t-pantry-kvstore-master-{i}.{PEERS}:7000" for i in range(3)]
MASTER_LIST = ",".join(MASTERS)
NODE_ID = POD_ENV["POD_NAME"]  # the rendered --node-id $(POD_NAME), as the tests expand it


def test_masters_are_a_statefulset_behind_a_headless_service(rendered: Rendered) -> None:
    ms = by_kind_name(rendered["standby"][1])
    # One Service for the masters, so a ServiceMonitor scrapes each master once.
    assert ("Service", "t-pantry-kvstore-master") not in ms
    assert ("Deployment", "t-pantry-kvstore-master") not in ms
    svc = ms[("Service", PEERS)]["spec"]
    assert (svc["clusterIP"], svc["publishNotReadyAddresses"]) == ("None", True)
    assert svc["selector"]["app.kubernetes.io/component"] == "kvstore-master"
    assert [(p["name"], p["port"]) for p in svc["ports"]] == [("grpc", 7000), ("metrics", 9100)]
    sts = ms[("StatefulSet", "t-pantry-kvstore-master")]["spec"]
    assert (sts["serviceName"], sts["replicas"], sts["podManagementPolicy"]) == (
        PEERS, 3, "Parallel")
    spec = sts["template"]["spec"]
    # A standby on the leader's host would die with it: spread, where the cluster can.
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (term["weight"], term["podAffinityTerm"]["topologyKey"],
            term["podAffinityTerm"]["labelSelector"]["matchLabels"][
                "app.kubernetes.io/component"]) == (100, "kubernetes.io/hostname",
                                                    "kvstore-master")
    # A standby's KVMaster health is NOT_SERVING (it refuses calls, naming the leader), so the
    # probes ask the server as a whole: every master is alive and Ready; clients find the
    # leader through the list, not through readiness.
    (c,) = spec["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 7000}


def test_each_master_advertises_its_own_entry_of_the_list(rendered: Rendered) -> None:
    ms = rendered["standby"][1]
    c = container(ms, "StatefulSet", "kvstore-master")
    assert c["args"] == [
        "master", "--host", "0.0.0.0", "--port", "7000", "--metrics-port", "9100",
        "--metadata", "redis://t-pantry-redis:6379/0", "--node-timeout", "10",
        "--lease-ms", "5000", "--high-watermark", "0.9", "--low-watermark", "0.8",
        "--max-object-bytes", "64MiB", "--replicas", "2", "--spill-watermark", "0.7",
        "--promote-after-hits", "2", "--tier-orders", "64", "--lease-ttl", "3",
        "--lease-renew", "1", "--advertise", f"$(POD_NAME).{PEERS}:7000",
        "--token-file", "/var/run/pantry/token", "--ready-file", "/tmp/ready.json"]
    # Kubernetes expands $(POD_NAME) per pod: master i advertises exactly entry i, which is what
    # lets a client follow a standby's "leader is HOST:PORT" straight to the leader.
    for i, address in enumerate(MASTERS):
        pod = dict(c, args=[a.replace("$(POD_NAME)", f"t-pantry-kvstore-master-{i}")
                            for a in c["args"]])
        config = config_of(pod)
        assert (config.advertise_address, config.replicas, config.lease_ttl_s,
                config.lease_renew_s) == (address, 2, 3.0, 1.0)


def test_every_client_is_given_every_master(rendered: Rendered) -> None:
    ms = rendered["standby"][1]
    node = container(ms, "StatefulSet", "kvstore-node")
    assert node["args"][:3] == ["node", "--master", MASTER_LIST]
    node_config = config_of(node)
    assert node_config.master_address == MASTER_LIST
    for kind, role in (("StatefulSet", "prefill"), ("StatefulSet", "decode"),
                       ("Deployment", "conductor")):
        c = container(ms, kind, role)
        i = c["args"].index("--kv-master")
        assert (c["args"][i + 1], c["args"].count("--kv-master")) == (MASTER_LIST, 1), role
        assert config_of(c).kv_master == MASTER_LIST, role


def test_one_master_keeps_its_service_and_no_lease_flags(rendered: Rendered) -> None:
    ms = rendered["defaults"][1]
    c = container(ms, "Deployment", "kvstore-master")
    assert [a for a in c["args"] if a in ("--advertise", "--lease-ttl", "--lease-renew")] == []
    config = config_of(c)
    assert (config.replicas, config.advertise_address) == (1, "")
    assert "clusterIP" not in by_kind_name(ms)[("Service", "t-pantry-kvstore-master")]["spec"]
    assert container(ms, "StatefulSet", "kvstore-node")["args"][1:3] == [
        "--master", "t-pantry-kvstore-master:7000"]


def test_notes_give_the_admin_commands_every_master(tmp_path: Path) -> None:
    proc = helm("install", "t", str(CHART), "--dry-run=client", "--namespace", "pantry",
                *values_args(CASES["standby"]), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("kubectl -n pantry exec statefulset/t-pantry-kvstore-master -- kvstore status "
            f"--master {MASTER_LIST}\n") in proc.stdout
    assert "Masters: 3, one leading; a standby takes over about 3 s after the leader dies." in (
        proc.stdout)


# ---- the rendered masters, run --------------------------------------------------------------

def _config(ms: list[Manifest], kind: str, role: str, **local: Any) -> Any:
    """A role's config from its rendered command line, with what only the pod has (address,
    ports, files) swapped for loopback and this test's."""
    config = config_of(container(ms, kind, role))
    return dataclasses.replace(config, host="127.0.0.1", port=0, metrics_port=0, **local)


@pytest.mark.slow
def test_rendered_standby_takes_over_when_the_leader_stops(tmp_path: Path) -> None:
    """Two masters from the chart's command lines on one real redis-server (advertising their
    loopback addresses, as the pods advertise their DNS names): one leads, a node given both
    follows it, and when the leader stops the standby takes over with the node's record."""
    redis_server = RedisServer(tmp_path)
    masters = []
    try:
        url = redis_server.url(1)
        proc = template(tmp_path, None, [
            'kvstore.master.metadata="redis"', f'redis.url="{url}"',
            "kvstore.master.standby.enabled=true", "auth.enabled=false"])
        assert proc.returncode == 0, proc.stderr
        ms = parse_manifests(proc.stdout)
        master_config = _config(ms, "StatefulSet", "kvstore-master", advertise_address="")
        assert (master_config.metadata, master_config.lease_ttl_s) == (url, 3.0)
        first = start_master(master_config)
        masters.append(first)
        wait_for(first.leading, what="the first master to take the lease")
        second = start_master(master_config)
        masters.append(second)
        addresses = f"127.0.0.1:{second.port},127.0.0.1:{first.port}"  # the standby first
        node = start_node(_config(
            ms, "StatefulSet", "kvstore-node", master_address=addresses, tcp_port=0,
            shm_dir=str(tmp_path), dram_bytes=4 << 20, prefault=False))
        try:
            with KVStoreClient(addresses) as client:
                wait_for(lambda: [n.node.node_id for n in client.status().nodes] == [
                    NODE_ID], what="the node registered with the leader")
                assert not second.leading()
                first.stop(grace=0)  # SIGTERM's path: the lease is released at once
                masters.remove(first)
                wait_for(second.leading, timeout=5, what="the standby to take over")
                status = client.status()
            assert ([n.node.node_id for n in status.nodes], status.capacity_bytes) == (
                [NODE_ID], 4 << 20)
        finally:
            node.stop()
    finally:
        for m in masters:
            m.stop(grace=0)
        redis_server.stop()


def test_most_replicas_reach_the_master(tmp_path: Path) -> None:
    """8, the schema's and the master's upper bound (9 fails, test_chart_values)."""
    proc = template(tmp_path, None, ["kvstore.master.replicas=8"])
    assert proc.returncode == 0, proc.stderr
    c = container(parse_manifests(proc.stdout), "Deployment", "kvstore-master")
    i = c["args"].index("--replicas")
    assert c["args"][i + 1] == "8"
    config = config_of(c)
    assert config.replicas == 8


def test_masters_reach_each_other_for_admin_commands(rendered: Rendered) -> None:
    """`kubectl exec` into one master pod runs `kvstore status --master <every master>`: the
    leader may be another pod, so the masters' NetworkPolicy lets masters in."""
    policies = {m["metadata"]["name"]: m for m in rendered["standby"][1]
                if m["kind"] == "NetworkPolicy"}
    (rule,) = policies["t-pantry-kvstore-master"]["spec"]["ingress"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for p in rule["from"]] == [
        "conductor", "prefill", "decode", "kvstore-node", "kvstore-master"]
    assert rule["ports"] == [{"port": 7000, "protocol": "TCP"}]
