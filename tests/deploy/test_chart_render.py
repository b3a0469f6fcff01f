"""The Helm chart renders, lints, validates against Kubernetes' schemas, and every container runs
a command line the real `pantry` and `kvstore` parsers and role configs accept."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from decode.config import DecodeLimits
from engine.role_config import EngineRoleConfig
from tests.deploy.chart_commands import config_of, parse_container
from tests.deploy.chart_rig import (
    CASES,
    CHART,
    EXAMPLES,
    REPO,
    Manifest,
    by_kind_name,
    container,
    helm,
    pod_specs,
    values_args,
    venv_tool,
)
from tests.deploy.conftest import Rendered


def test_examples_are_the_two_the_issue_names() -> None:
    assert [p.name for p in EXAMPLES] == ["multi-node.yaml", "single-node.yaml"]


@pytest.mark.parametrize("case", list(CASES))
def test_helm_lint_strict(case: str, tmp_path: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), *values_args(CASES[case]), home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "1 chart(s) linted, 0 chart(s) failed"


BASE_KINDS = {"Deployment": 2, "StatefulSet": 3, "Service": 5, "NetworkPolicy": 5,
              "PodDisruptionBudget": 5}
KINDS = {
    "defaults": {**BASE_KINDS, "Secret": 1},
    "examples/single-node.yaml": {**BASE_KINDS, "Secret": 1},
    "examples/multi-node.yaml": {"Deployment": 1, "StatefulSet": 4, "DaemonSet": 1, "Service": 6,
                                 "Ingress": 1, "NetworkPolicy": 6, "PodDisruptionBudget": 5,
                                 "ServiceMonitor": 5, "Secret": 1},
    "options": {"Deployment": 2, "StatefulSet": 4, "Service": 6, "Ingress": 1,
                "NetworkPolicy": 6, "PodDisruptionBudget": 5, "ServiceMonitor": 5, "Secret": 1},
    # The token Secret is the operator's own, and the Redis is outside the release.
    "external": BASE_KINDS,
    "no-auth": BASE_KINDS,
    # The masters are a StatefulSet; the bundled Redis adds its own.
    "standby": {"Deployment": 1, "StatefulSet": 5, "Service": 6, "NetworkPolicy": 6,
                "PodDisruptionBudget": 5, "Secret": 1},
}

@pytest.mark.parametrize("case", list(CASES))
def test_kinds_rendered(case: str, rendered: Rendered) -> None:
    assert Counter(m["kind"] for m in rendered[case][1]) == KINDS[case]


def test_kubernetes_validate_strict(rendered: Rendered) -> None:
    """One run over every rendered file. ServiceMonitor is a CRD kubernetes-validate has no
    schema for: it may only warn about that kind, and test_service_monitors checks its shape."""
    files = [str(path) for path, _ in rendered.values()]
    proc = subprocess.run([str(venv_tool("kubernetes-validate")), "--strict", "--quiet", *files],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    crd = ("Couldn't find schema for kind ServiceMonitor with api version "
           "monitoring.coreos.com/v1 for kubernetes version")
    assert [line for line in lines if crd not in line] == []
    assert len(lines) == sum(KINDS[c].get("ServiceMonitor", 0) for c in CASES)


# ---- the command lines the containers run --------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_every_command_line_is_accepted_by_the_real_cli(
        case: str, rendered: Rendered) -> None:
    roles = []
    for m, spec in pod_specs(rendered[case][1]):
        for c in spec["containers"]:
            if c["name"] == "redis":
                continue
            ns, configs = parse_container(c)
            roles.append((m["metadata"]["labels"]["app.kubernetes.io/component"], ns.cmd,
                          [type(cfg).__name__ for cfg in configs]))
    assert sorted(roles) == [
        ("conductor", "conductor", ["ConductorConfig"]),
        ("decode", "decode", ["EngineRoleConfig", "DecodeLimits"]),
        ("kvstore-master", "master", ["MasterConfig"]),
        ("kvstore-node", "node", ["NodeConfig"]),
        ("prefill", "prefill", ["EngineRoleConfig", "PrefillLimits"]),
    ]


def test_default_command_lines(rendered: Rendered) -> None:
    ms = rendered["defaults"][1]
    assert container(ms, "Deployment", "conductor")["args"] == [
        "--log-level", "INFO", "conductor", "--model", "smollm2",
        "--kv-master", "t-pantry-kvstore-master:7000",
        "--prefill", "t-pantry-prefill-0.t-pantry-prefill:7100",
        "--decode", "t-pantry-decode-0.t-pantry-decode:7200",
        "--host", "0.0.0.0", "--grpc-port", "50051", "--http-port", "8000",
        "--default-max-tokens", "256", "--max-request-bytes", "8MiB",
        "--max-concurrent-requests", "256", "--ttft-slo", "0",
        "--decode-prefill-tokens", "0", "--engine-timeout-s", "600",
        "--token-file", "/var/run/pantry/token", "--ready-file", "/tmp/ready.json"]
    engine_common = [
        "--model", "smollm2", "--kv-master", "t-pantry-kvstore-master:7000",
        "--engine-id", "$(POD_NAME)", "--host", "$(POD_IP)"]
    assert container(ms, "StatefulSet", "prefill")["args"] == [
        "--log-level", "INFO", "prefill", *engine_common, "--port", "7100",
        "--metrics-port", "9101", "--block-size", "16", "--hash-seed", "0",
        "--kv-cache-bytes", "1GiB", "--max-model-len", "0", "--threads", "0",
        "--chunk-tokens", "2048", "--token-file", "/var/run/pantry/token",
        "--ready-file", "/tmp/ready.json"]
    assert container(ms, "StatefulSet", "decode")["args"] == [
        "--log-level", "INFO", "decode", *engine_common, "--port", "7200",
        "--metrics-port", "9102", "--block-size", "16", "--hash-seed", "0",
        "--kv-cache-bytes", "1GiB", "--max-model-len", "0", "--threads", "0",
        "--chunk-tokens", "256", "--max-running", "32", "--max-waiting", "256",
        "--token-file", "/var/run/pantry/token", "--ready-file", "/tmp/ready.json"]
    assert container(ms, "Deployment", "kvstore-master")["args"] == [
        "master", "--host", "0.0.0.0", "--port", "7000", "--metrics-port", "9100",
        "--metadata", "memory", "--node-timeout", "10", "--lease-ms", "5000",
        "--high-watermark", "0.9", "--low-watermark", "0.8", "--max-object-bytes", "64MiB",
        "--replicas", "1", "--token-file", "/var/run/pantry/token",
        "--ready-file", "/tmp/ready.json"]
    assert container(ms, "StatefulSet", "kvstore-node")["args"] == [
        "node", "--master", "t-pantry-kvstore-master:7000", "--node-id", "$(POD_NAME)",
        "--dram-bytes", "1GiB", "--host", "$(POD_IP)", "--port", "7300", "--tcp-port", "7301",
        "--metrics-port", "9103", "--heartbeat", "2", "--shm-dir", "/dev/shm",
        "--max-object-bytes", "64MiB", "--prefault", "--token-file", "/var/run/pantry/token",
        "--ready-file", "/tmp/ready.json"]


def test_defaults_parse_to_the_roles_own_defaults(
        rendered: Rendered) -> None:
    """The chart's defaults are the code's: a chart default that drifted would show here."""
    ms = rendered["defaults"][1]
    _, (engine, limits) = parse_container(container(ms, "StatefulSet", "decode"))
    assert engine == EngineRoleConfig(
        model="smollm2", kv_master="t-pantry-kvstore-master:7000", engine_id="t-pantry-x-0",
        host="10.1.2.3", port=7200, metrics_port=9102, ready_file="/tmp/ready.json",
        token_file="/var/run/pantry/token")
    assert limits == DecodeLimits()
    _, (node,) = parse_container(container(ms, "StatefulSet", "kvstore-node"))
    assert (node.dram_bytes, node.tcp_port, node.max_object_bytes) == (1 << 30, 7301, 64 << 20)


def test_multi_node_command_lines(rendered: Rendered) -> None:
    ms = rendered["examples/multi-node.yaml"][1]
    ns, (conductor,) = parse_container(container(ms, "Deployment", "conductor"))
    assert conductor.prefill == tuple(
        f"t-pantry-prefill-{i}.t-pantry-prefill:7100" for i in range(4))
    assert conductor.decode == tuple(f"t-pantry-decode-{i}.t-pantry-decode:7200" for i in range(6))
    assert (conductor.model, conductor.served_model_name, conductor.ttft_slo_s) == (
        "/models/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct", 2.0)
    _, (engine, _limits) = parse_container(container(ms, "StatefulSet", "prefill"))
    assert (engine.salt, engine.max_model_len, engine.kv_cache_bytes, engine.threads) == (
        "prod-eu1", 8192, 16 << 30, 30)
    node = container(ms, "DaemonSet", "kvstore-node")
    assert node["args"][3:7] == ["--node-id", "$(NODE_NAME)", "--dram-bytes", "64GiB"]
    assert node["resources"]["limits"]["memory"] == str((64 + 2) << 30)
    assert config_of(node).master_address == (
        "t-pantry-kvstore-master-0.t-pantry-kvstore-masters:7000,"
        "t-pantry-kvstore-master-1.t-pantry-kvstore-masters:7000")
    assert (config_of(node).ssd_dir, config_of(node).ssd_bytes) == (
        "/var/lib/pantry/ssd", 500 << 30)
    assert config_of(container(ms, "StatefulSet", "kvstore-master")).replicas == 2


def test_options_command_lines(rendered: Rendered) -> None:
    ms = rendered["options"][1]
    _, (conductor,) = parse_container(container(ms, "Deployment", "conductor"))
    assert (conductor.model, len(conductor.prefill), len(conductor.decode)) == (
        "/models/smollm2-dir", 2, 3)
    _, (prefill, _limits) = parse_container(container(ms, "StatefulSet", "prefill"))
    assert (prefill.cpus, prefill.salt) == ((0, 1), "team-a")
    master = container(ms, "Deployment", "kvstore-master")
    assert master["args"][:2] == ["--verbose", "master"]
    _, (node,) = parse_container(container(ms, "StatefulSet", "kvstore-node"))
    assert (node.prefault, node.tcp_port) == (False, 7301)


# ---- pods: probes, security, resources, volumes -----------------------------------------------

def test_probes_name_each_roles_grpc_service(
        rendered: Rendered) -> None:
    """The gRPC health service each probe asks about is the one the role registers."""
    from conductor.grpc_api import SERVICE_NAME as conductor_service
    from decode.service import SERVICE_NAME as decode_service
    from kvstore.node_service import SERVICE_NAME as node_service
    from prefill.service import SERVICE_NAME as prefill_service

    expected = {
        "conductor": (conductor_service, 50051), "prefill": (prefill_service, 7100),
        "decode": (decode_service, 7200), "kvstore-master": ("", 7000),
        "kvstore-node": (node_service, 7300)}
    for m, spec in pod_specs(rendered["defaults"][1]):
        (c,) = spec["containers"]
        role = m["metadata"]["labels"]["app.kubernetes.io/component"]
        # The master's probes ask the server as a whole: a standby's KVMaster health is
        # NOT_SERVING, yet it is alive and must stay Ready to take over.
        want = ({"port": 7000} if role == "kvstore-master"
                else {"service": expected[role][0], "port": expected[role][1]})
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == want


@pytest.mark.parametrize("case", list(CASES))
def test_every_pod_is_locked_down_and_sized(
        case: str, rendered: Rendered) -> None:
    for m, spec in pod_specs(rendered[case][1]):
        name = m["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] in (10001, 999), name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}, name
            assert {"readinessProbe", "livenessProbe"} <= c.keys(), name
            assert "memory" in c["resources"]["limits"], name
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name


def test_storage_node_shm_is_sized_from_values(
        rendered: Rendered) -> None:
    ms = rendered["defaults"][1]
    spec = by_kind_name(ms)[("StatefulSet", "t-pantry-kvstore-node")]["spec"]["template"]["spec"]
    assert spec["volumes"] == [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "token", "secret": {"secretName": "t-pantry-token", "defaultMode": 0o440,
                                     "items": [{"key": "token", "path": "token"}]}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    (c,) = spec["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/var/run/pantry", "/dev/shm"}
    # 1 GiB of segment + 512 MiB for the process: the tmpfs pages count toward the pod.
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "1610612736"},
                              "limits": {"memory": "1610612736"}}
    assert "hostIPC" not in spec and "hostNetwork" not in spec


def test_shm_transport_shares_the_hosts_ipc_and_network(
        rendered: Rendered) -> None:
    ms = by_kind_name(rendered["options"][1])
    for role in ("prefill", "decode", "kvstore-node"):
        spec = ms[("StatefulSet", f"t-pantry-{role}")]["spec"]["template"]["spec"]
        assert (spec["hostIPC"], spec["hostNetwork"], spec["dnsPolicy"]) == (
            True, True, "ClusterFirstWithHostNet"), role
        # Two pods of a role on one host would collide on their ports.
        (term,) = spec["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
    node = ms[("StatefulSet", "t-pantry-kvstore-node")]["spec"]["template"]["spec"]
    # The host's /dev/shm, not a tmpfs.
    assert [v["name"] for v in node["volumes"]] == ["tmp", "token"]
    conductor = ms[("Deployment", "t-pantry-conductor")]["spec"]["template"]["spec"]
    assert "hostNetwork" not in conductor and "affinity" not in conductor


def test_gpu_and_rdma_requests(rendered: Rendered) -> None:
    ms = rendered["options"][1]
    assert container(ms, "StatefulSet", "prefill")["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1,
                     "rdma/hca_shared_devices_a": 1},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": 1, "rdma/hca_shared_devices_a": 1}}
    assert container(ms, "StatefulSet", "decode")["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 2},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": 2}}


def test_model_volumes(rendered: Rendered) -> None:
    volumes = {
        case: {v["name"]: {k: x for k, x in v.items() if k != "name"}
               for v in container_spec["volumes"]}
        for case in ("defaults", "examples/multi-node.yaml", "options")
        for m, container_spec in pod_specs(rendered[case][1])
        if m["metadata"]["name"] == "t-pantry-prefill"}
    assert "model" not in volumes["defaults"]
    assert volumes["examples/multi-node.yaml"]["model"] == {
        "persistentVolumeClaim": {"claimName": "pantry-models", "readOnly": True}}
    assert volumes["options"]["model"] == {"hostPath": {"path": "/srv/models",
                                                        "type": "Directory"}}


# ---- discovery, exposure, isolation, monitoring ----------------------------------------------

def test_engines_are_discovered_through_headless_services(
        rendered: Rendered) -> None:
    ms = by_kind_name(rendered["examples/multi-node.yaml"][1])
    for role, port, replicas in (("prefill", 7100, 4), ("decode", 7200, 6)):
        svc = ms[("Service", f"t-pantry-{role}")]["spec"]
        assert (svc["clusterIP"], svc["publishNotReadyAddresses"]) == ("None", True)
        assert svc["ports"][0] == {"name": "grpc", "port": port, "targetPort": "grpc",
                                   "appProtocol": "grpc"}
        sts = ms[("StatefulSet", f"t-pantry-{role}")]["spec"]
        assert (sts["serviceName"], sts["replicas"]) == (f"t-pantry-{role}", replicas)


def test_conductor_service_and_ingress(rendered: Rendered) -> None:
    ms = by_kind_name(rendered["examples/multi-node.yaml"][1])
    assert ms[("Service", "t-pantry-conductor")]["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http"},
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"}]
    ingress = ms[("Ingress", "t-pantry-conductor")]["spec"]
    assert ingress["rules"] == [{"host": "pantry.example.com", "http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {
            "name": "t-pantry-conductor", "port": {"name": "http"}}}}]}}]
    assert ingress["tls"] == [{"hosts": ["pantry.example.com"], "secretName": "pantry-tls"}]


def _sources(policy: Manifest) -> list[tuple[list[str], list[int]]]:
    rules = []
    for rule in policy["spec"]["ingress"]:
        peers = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                 if "podSelector" in p else yaml.safe_dump(p).strip()
                 for p in rule.get("from", [])]
        rules.append((peers, [p["port"] for p in rule["ports"]]))
    return rules


def test_only_the_conductor_is_reachable_from_outside(
        rendered: Rendered) -> None:
    policies = {m["metadata"]["name"].removeprefix("t-pantry-"): _sources(m)
                for m in rendered["options"][1] if m["kind"] == "NetworkPolicy"}
    assert policies == {
        "conductor": [([], [8000, 50051])],
        "prefill": [(["conductor"], [7100])],
        "decode": [(["conductor"], [7200])],
        "kvstore-master": [(["conductor", "prefill", "decode", "kvstore-node"], [7000])],
        "kvstore-node": [(["prefill", "decode", "kvstore-master"], [7300, 7301])],
        "redis": [(["kvstore-master"], [6379])],
    }
    multi = {m["metadata"]["name"].removeprefix("t-pantry-"): _sources(m)
             for m in rendered["examples/multi-node.yaml"][1] if m["kind"] == "NetworkPolicy"}
    monitoring = ("namespaceSelector:\n  matchLabels:\n"
                  "    kubernetes.io/metadata.name: monitoring")
    assert multi["decode"] == [(["conductor"], [7200]), ([monitoring], [9102])]


def test_service_monitors(rendered: Rendered) -> None:
    monitors = [m for m in rendered["examples/multi-node.yaml"][1]
                if m["kind"] == "ServiceMonitor"]
    assert {m["apiVersion"] for m in monitors} == {"monitoring.coreos.com/v1"}
    got = {m["metadata"]["name"]: (m["metadata"]["labels"]["release"],
                                   m["spec"]["selector"]["matchLabels"][
                                       "app.kubernetes.io/component"],
                                   m["spec"]["endpoints"]) for m in monitors}
    endpoint = {"path": "/metrics", "interval": "15s"}
    assert got == {
        "t-pantry-conductor": ("kube-prometheus-stack", "conductor",
                               [{"port": "http", **endpoint}]),
        **{f"t-pantry-{r}": ("kube-prometheus-stack", r, [{"port": "metrics", **endpoint}])
           for r in ("prefill", "decode", "kvstore-master", "kvstore-node")}}
    services = by_kind_name(rendered["examples/multi-node.yaml"][1])
    # One Service per role, so each pod is scraped once (standby masters: the headless one).
    for service in ("prefill", "decode", "kvstore-masters", "kvstore-node"):
        ports = {p["name"] for p in services[("Service", f"t-pantry-{service}")]["spec"]["ports"]}
        assert "metrics" in ports, service
    per_role = Counter(m["metadata"]["labels"]["app.kubernetes.io/component"]
                       for m in rendered["examples/multi-node.yaml"][1] if m["kind"] == "Service")
    assert set(per_role.values()) == {1}


def test_disruption_budgets(rendered: Rendered) -> None:
    pdbs = {m["metadata"]["name"]: (m["spec"]["maxUnavailable"],
                                    m["spec"]["selector"]["matchLabels"][
                                        "app.kubernetes.io/component"])
            for m in rendered["defaults"][1] if m["kind"] == "PodDisruptionBudget"}
    assert pdbs == {f"t-pantry-{r}": (1, r) for r in (
        "conductor", "prefill", "decode", "kvstore-master", "kvstore-node")}


def test_bundled_redis(rendered: Rendered) -> None:
    sts = by_kind_name(rendered["options"][1])[("StatefulSet", "t-pantry-redis")]["spec"]
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "8Gi"}}}
    (c,) = sts["template"]["spec"]["containers"]
    assert (c["image"], c["command"], c["volumeMounts"]) == (
        "redis:7.4.2", ["redis-server"], [{"name": "data", "mountPath": "/data"}])


def test_notes_tell_how_to_watch_the_pool(tmp_path: Path) -> None:
    proc = helm("install", "t", str(CHART), "--dry-run=client", "--namespace", "pantry",
                home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("kubectl -n pantry exec deploy/t-pantry-kvstore-master -- kvstore status "
            "--master 127.0.0.1:7000") in proc.stdout


def test_chart_readme_documents_every_values_group() -> None:
    readme = (CHART / "README.md").read_text()
    for key in ("conductor", "prefill", "decode", "kvstore.master", "kvstore.node", "redis",
                "model"):
        assert f"`{key}`" in readme, key
    for command in ("helm install pantry", "helm upgrade pantry", "--set prefill.replicas=4",
                    "--set decode.replicas=8", "/metrics", "helm uninstall pantry",
                    "exec deploy/pantry-kvstore-master -- kvstore status",
                    "exec -it deploy/pantry-kvstore-master -- kvstore events --master "
                    "127.0.0.1:7000 --json",
                    "exec deploy/pantry-kvstore-master -- kvstore drain pantry-kvstore-node-3"):
        assert command in readme, command
    for section in ("## Standby masters", "## SSD tier", "## Operate", "### The values table"):
        assert f"\n{section}\n" in readme, section
    assert "2.4 to 4.0 s after a SIGKILL of the leader" in readme
    # The values table names every key the pool issue added.
    values = yaml.safe_load((CHART / "values.yaml").read_text())["kvstore"]
    table = readme.split("### The values table", 1)[1].split("\n## ", 1)[0]
    keys = [f"kvstore.master.{k}" for k in ("replicas", "spillWatermark", "promoteAfterHits",
                                            "tierOrders")]
    keys += [f"kvstore.master.standby.{k}" for k in values["master"]["standby"]]
    keys += [f"kvstore.master.leaderLease.{k}" for k in values["master"]["leaderLease"]]
    keys += [f"kvstore.node.ssd.{k}" for k in values["node"]["ssd"]
             if k not in ("lowWatermark", "storageClassName", "hostPath")]
    for key in keys:
        assert f"`{key}`" in table, key
    for key in ("lowWatermark", "storageClassName", "hostPath"):  # named in a row of another key
        assert f"`{key}`" in table, key
    assert (REPO / "deploy" / "helm" / "pantry" / "values.schema.json").is_file()
