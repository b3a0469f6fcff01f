"""The storage nodes' SSD tier as the chart renders it: the node's and the master's flags, and the
volume the files live in (an emptyDir, a claim per StatefulSet pod, or a DaemonSet host's
directory), each render valid for Kubernetes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.chart_commands import config_of
from tests.deploy.chart_rig import (
    Manifest,
    by_kind_name,
    container,
    parse_manifests,
    template,
    venv_tool,
)
from tests.deploy.conftest import Rendered

SSD_DIR = "/var/lib/pantry/ssd"
GIB = 1 << 30
# Each extra render: its --set-json values; the standby case (a claim per pod) is in CASES.
RENDERS = {
    "emptyDir": ["kvstore.node.ssd.enabled=true"],
    "hostPath": ["kvstore.node.ssd.enabled=true", 'kvstore.node.kind="DaemonSet"',
                 'kvstore.node.ssd.volume="hostPath"',
                 'kvstore.node.ssd.hostPath="/mnt/nvme/pantry"', 'kvstore.node.ssd.size="500Gi"'],
}


@pytest.fixture(scope="module")
def ssd_renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Manifest]]]:
    home = tmp_path_factory.mktemp("helm")
    out = {}
    for name, set_json in RENDERS.items():
        proc = template(home, None, set_json)
        assert proc.returncode == 0, proc.stderr
        path = home / f"{name}.yaml"
        path.write_text(proc.stdout)
        out[name] = (path, parse_manifests(proc.stdout))
    return out


def _node(ms: list[Manifest], kind: str = "StatefulSet") -> tuple[dict[str, Any], dict[str, Any]]:
    """The storage nodes' workload spec and their one container."""
    spec = by_kind_name(ms)[(kind, "t-pantry-kvstore-node")]["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    return spec, c


def _ssd_args(args: list[str]) -> list[str]:
    i = args.index("--ssd-dir")
    return args[i:i + 8]


def test_node_flags_and_a_claim_per_pod(rendered: Rendered) -> None:
    ms = rendered["standby"][1]
    spec, c = _node(ms)
    assert _ssd_args(c["args"]) == [
        "--ssd-dir", SSD_DIR, "--ssd-bytes", "100GiB", "--ssd-high-watermark", "0.95",
        "--ssd-low-watermark", "0.85"]
    node = config_of(c)
    assert (node.ssd_dir, node.ssd_bytes, node.ssd_high_watermark, node.ssd_low_watermark) == (
        SSD_DIR, 100 * GIB, 0.95, 0.85)
    assert {"name": "ssd", "mountPath": SSD_DIR} in c["volumeMounts"]
    # The claim outlives the pod: a node restarted on it serves its files again.
    assert "ssd" not in [v["name"] for v in spec["template"]["spec"]["volumes"]]
    assert spec["volumeClaimTemplates"] == [{
        "metadata": {"name": "ssd", "labels": {
            "app.kubernetes.io/name": "pantry", "app.kubernetes.io/instance": "t",
            "app.kubernetes.io/component": "kvstore-node"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-nvme",
                 "resources": {"requests": {"storage": str(101 * GIB)}}}}]


def test_master_gets_the_tiering_flags_only_with_the_tier(rendered: Rendered) -> None:
    master = config_of(container(rendered["standby"][1], "StatefulSet",
                                             "kvstore-master"))
    assert (master.spill_watermark, master.promote_after_hits, master.tier_orders) == (
        0.7, 2, 64)
    plain = container(rendered["defaults"][1], "Deployment", "kvstore-master")["args"]
    assert [a for a in plain if a in ("--spill-watermark", "--promote-after-hits",
                                      "--tier-orders")] == []
    _, c = _node(rendered["defaults"][1])
    assert "--ssd-dir" not in c["args"]
    assert "ssd" not in [m["name"] for m in c["volumeMounts"]]


def test_empty_dir_by_default(ssd_renders: dict[str, tuple[Path, list[Manifest]]]) -> None:
    spec, c = _node(ssd_renders["emptyDir"][1])
    assert _ssd_args(c["args"]) == [
        "--ssd-dir", SSD_DIR, "--ssd-bytes", "16GiB", "--ssd-high-watermark", "0.95",
        "--ssd-low-watermark", "0.85"]
    # 16 GiB of objects + 1 GiB of room: the tier never fills the volume, so the kubelet never
    # evicts the pod for going over its sizeLimit.
    assert spec["template"]["spec"]["volumes"][-1] == {
        "name": "ssd", "emptyDir": {"sizeLimit": str(17 * GIB)}}
    assert "volumeClaimTemplates" not in spec
    assert {"name": "ssd", "mountPath": SSD_DIR} in c["volumeMounts"]


def test_host_path_on_a_daemonset(ssd_renders: dict[str, tuple[Path, list[Manifest]]]) -> None:
    spec, c = _node(ssd_renders["hostPath"][1], "DaemonSet")
    node = config_of(c)
    assert (node.ssd_dir, node.ssd_bytes) == (SSD_DIR, 500 * GIB)
    assert spec["template"]["spec"]["volumes"][-1] == {
        "name": "ssd", "hostPath": {"path": "/mnt/nvme/pantry", "type": "Directory"}}


def test_ssd_renders_are_valid_kubernetes(
        ssd_renders: dict[str, tuple[Path, list[Manifest]]]) -> None:
    proc = subprocess.run([str(venv_tool("kubernetes-validate")), "--strict", "--quiet",
                           *(str(path) for path, _ in ssd_renders.values())],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
