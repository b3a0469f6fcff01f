"""Runs the offline deploy tools (helm, kubernetes-validate, hadolint) on deploy/.

helm comes from scripts/setup.sh (into .cache/tools), the other two are pinned test dependencies
in .venv. A missing tool skips its tests on a developer machine and fails them under CI=true,
where the set-up must have installed it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "pantry"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DOCKER = REPO / "deploy" / "docker"
HELM = REPO / ".cache" / "tools" / "helm"
RELEASE = "t"
HERE = Path(__file__).parent
# What the chart tests render: the defaults, each example, every option on at once, an external
# Redis with a token Secret of the operator's own, no token, and standby masters with an SSD tier.
CASES: dict[str, Path | None] = {
    "defaults": None, **{f"examples/{p.name}": p for p in EXAMPLES},
    "options": HERE / "values-options.yaml", "external": HERE / "values-external.yaml",
    "no-auth": HERE / "values-no-auth.yaml", "standby": HERE / "values-standby.yaml"}

Manifest = dict[str, Any]


def require_tool(path: Path) -> Path:
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"{path.relative_to(REPO)} is missing: run scripts/setup.sh (make setup)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}")
    pytest.skip(reason)


def venv_tool(name: str) -> Path:
    return require_tool(Path(sys.executable).parent / name)


def helm(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """helm with its cache, config and data under `home`: nothing read from or written to the
    user's helm set-up, no repository ever contacted."""
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    return subprocess.run([str(require_tool(HELM)), *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def values_args(values_file: Path | None, set_json: Sequence[str] = ()) -> list[str]:
    args = ["-f", str(values_file)] if values_file else []
    for item in set_json:
        args += ["--set-json", item]
    return args


def template(home: Path, values_file: Path | None = None,
             set_json: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", "pantry",
                *values_args(values_file, set_json), home=home)


def parse_manifests(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind_name(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield m, m["spec"]["template"]["spec"]


def container(manifests: list[Manifest], kind: str, role: str) -> dict[str, Any]:
    m = by_kind_name(manifests)[(kind, f"{RELEASE}-pantry-{role}")]
    (c,) = m["spec"]["template"]["spec"]["containers"]
    return dict(c)


def master_kind(manifests: list[Manifest]) -> str:
    """The masters' workload: one master is a Deployment, standby masters a StatefulSet."""
    (kind,) = [m["kind"] for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
               and m["metadata"]["name"] == f"{RELEASE}-pantry-kvstore-master"]
    return str(kind)
