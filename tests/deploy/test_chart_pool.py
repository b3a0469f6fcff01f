"""The pool's metadata store and service token as the chart renders them: the master's
`--metadata` (memory, the bundled Redis, an external one), the token Secret, its mount, flag and
env in every Pantry container, and a master and storage node started from the rendered command
lines: records in a real redis-server, callers without the rendered token refused."""

from __future__ import annotations

import base64
import dataclasses
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from kvstore.auth import TOKEN_FILE_ENV, UNAUTHENTICATED, load_token
from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.master_service import start_master
from kvstore.node_service import start_node
from kvstore.redis_metadata import NODES
from tests.deploy.chart_commands import parse_container
from tests.deploy.chart_rig import (
    CASES,
    Manifest,
    by_kind_name,
    container,
    master_kind,
    parse_manifests,
    pod_specs,
    template,
)
from tests.deploy.conftest import Rendered
from tests.kvstore.kv_helpers import RedisServer, wait_for

TOKEN_FILE = "/var/run/pantry/token"
# With Redis metadata the master campaigns for the leader lease (the defaults, 3 s / 1 s).
MASTER_TAIL = ["--node-timeout", "10", "--lease-ms", "5000", "--high-watermark", "0.9",
               "--low-watermark", "0.8", "--max-object-bytes", "64MiB", "--replicas", "1",
               "--lease-ttl", "3", "--lease-renew", "1"]
METADATA = {
    "defaults": "memory", "examples/single-node.yaml": "memory",
    "examples/multi-node.yaml": "redis://t-pantry-redis:6379/0",
    "options": "redis://t-pantry-redis:6379/0", "external": "redis://redis.data.svc:6380/3",
    "no-auth": "memory", "standby": "redis://t-pantry-redis:6379/0"}
# The Secret each case mounts, and the key the token is under in it; None: no token.
CHART_SECRET = ("t-pantry-token", "token")
TOKEN_SECRET: dict[str, tuple[str, str] | None] = {
    "defaults": CHART_SECRET, "examples/single-node.yaml": CHART_SECRET,
    "examples/multi-node.yaml": CHART_SECRET, "options": CHART_SECRET,
    "external": ("pantry-pool-token", "pool-token"), "no-auth": None, "standby": CHART_SECRET}
# Every role takes --token-file; $PANTRY_TOKEN_FILE also reaches the admin commands run in a pod.
FLAGGED = {"conductor", "prefill", "decode", "kvstore-master", "kvstore-node"}


def test_every_case_is_covered() -> None:
    assert set(METADATA) == set(TOKEN_SECRET) == set(CASES)


# ---- metadata -----------------------------------------------------------------------------------

def test_master_with_the_bundled_redis(rendered: Rendered) -> None:
    ms = rendered["options"][1]
    assert container(ms, "Deployment", "kvstore-master")["args"] == [
        "--verbose", "master", "--host", "0.0.0.0", "--port", "7000", "--metrics-port", "9100",
        "--metadata", "redis://t-pantry-redis:6379/0", *MASTER_TAIL,
        "--token-file", TOKEN_FILE, "--ready-file", "/tmp/ready.json"]
    # The URL names the bundled Redis's Service and port, which only the master may reach.
    svc = by_kind_name(ms)[("Service", "t-pantry-redis")]["spec"]
    assert [(p["name"], p["port"]) for p in svc["ports"]] == [("redis", 6379)]


def test_master_with_an_external_redis(rendered: Rendered) -> None:
    ms = rendered["external"][1]
    assert container(ms, "Deployment", "kvstore-master")["args"] == [
        "master", "--host", "0.0.0.0", "--port", "7000", "--metrics-port", "9100",
        "--metadata", "redis://redis.data.svc:6380/3", *MASTER_TAIL,
        "--token-file", TOKEN_FILE, "--ready-file", "/tmp/ready.json"]
    assert ("StatefulSet", "t-pantry-redis") not in by_kind_name(ms)


@pytest.mark.parametrize("case", list(CASES))
def test_master_config_metadata(case: str, rendered: Rendered) -> None:
    ms = rendered[case][1]
    _, (master,) = parse_container(container(ms, master_kind(ms), "kvstore-master"))
    assert isinstance(master, MasterConfig)
    assert master.metadata == METADATA[case]


# ---- service token ------------------------------------------------------------------------------

def _secrets(ms: list[Manifest]) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in ms if m["kind"] == "Secret"}


def _token(ms: list[Manifest]) -> str:
    return base64.b64decode(_secrets(ms)["t-pantry-token"]["data"]["token"]).decode()


def test_generated_token_secret(rendered: Rendered, tmp_path: Path) -> None:
    ms = rendered["defaults"][1]
    (secret,) = _secrets(ms).values()
    assert (secret["metadata"]["name"], secret["type"], list(secret["data"])) == (
        "t-pantry-token", "Opaque", ["token"])
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "token"
    token = _token(ms)
    assert (len(token), set(token) <= set(string.ascii_letters + string.digits)) == (48, True)
    # What the roles will read from the mounted file is the token the Secret holds.
    (tmp_path / "token").write_text(token)
    assert load_token(str(tmp_path / "token")) == token


def test_given_token_and_existing_secret(rendered: Rendered) -> None:
    assert _token(rendered["options"][1]) == "options-token-0123456789"
    # The operator's Secret (external) or no token (no-auth): the chart makes no Secret.
    assert _secrets(rendered["external"][1]) == _secrets(rendered["no-auth"][1]) == {}


def test_offline_render_generates_a_new_token_each_time(tmp_path: Path) -> None:
    """`helm template` cannot look the release's Secret up: why the README asks `helm template`
    pipelines for auth.token or auth.existingSecret."""
    first, second = (template(tmp_path, None) for _ in range(2))
    assert (first.returncode, second.returncode) == (0, 0)
    assert _token(parse_manifests(first.stdout)) != _token(parse_manifests(second.stdout))


def _pantry_containers(ms: list[Manifest]) -> Iterator[tuple[str, dict[str, Any],
                                                             dict[str, Any]]]:
    for m, spec in pod_specs(ms):
        for c in spec["containers"]:
            if c["name"] != "redis":
                yield m["metadata"]["labels"]["app.kubernetes.io/component"], spec, c


@pytest.mark.parametrize("case", list(CASES))
def test_token_reaches_every_pantry_container(case: str, rendered: Rendered) -> None:
    expected = TOKEN_SECRET[case]
    roles = set()
    for role, spec, c in _pantry_containers(rendered[case][1]):
        roles.add(role)
        volumes = [v for v in spec["volumes"] if v["name"] == "token"]
        mounts = [m for m in c["volumeMounts"] if m["name"] == "token"]
        env = [e for e in c["env"] if e["name"] == TOKEN_FILE_ENV]
        config: Any
        _, (config, *_limits) = parse_container(c)
        if expected is None:
            assert (volumes, mounts, env, "--token-file" in c["args"]) == ([], [], [], False), role
            assert getattr(config, "token_file", None) is None, role
            continue
        name, key = expected
        assert volumes == [{"name": "token", "secret": {
            "secretName": name, "defaultMode": 0o440,
            "items": [{"key": key, "path": "token"}]}}], role
        assert mounts == [{"name": "token", "mountPath": "/var/run/pantry", "readOnly": True}]
        assert env == [{"name": TOKEN_FILE_ENV, "value": TOKEN_FILE}], role
        assert role in FLAGGED
        i = c["args"].index("--token-file")
        assert (c["args"][i + 1], c["args"].count("--token-file")) == (TOKEN_FILE, 1), role
        assert config.token_file == TOKEN_FILE, role
    assert roles == {"conductor", "prefill", "decode", "kvstore-master", "kvstore-node"}


def test_redis_pod_gets_no_token(rendered: Rendered) -> None:
    spec = by_kind_name(rendered["options"][1])[("StatefulSet", "t-pantry-redis")]
    assert [v["name"] for v in spec["spec"]["template"]["spec"].get("volumes", [])] == []


# ---- the rendered pool, run --------------------------------------------------------------------

def _role_config(ms: list[Manifest], kind: str, role: str, **local: Any) -> Any:
    """The role's config from its rendered command line, with what only the pod has (its ports,
    address, mounted files) swapped for loopback and this test's files."""
    config: Any
    _, (config,) = parse_container(container(ms, kind, role))
    return dataclasses.replace(config, host="127.0.0.1", port=0, metrics_port=0, **local)


def test_rendered_pool_runs_on_redis_and_asks_for_the_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Master and storage node started from the chart's command lines (memory shrunk to a test's
    size): the node registers with the rendered token, the master keeps the record in a real
    redis-server, and a caller without the token is refused."""
    redis_server = RedisServer(tmp_path)
    try:
        url = redis_server.url(2)
        proc = template(tmp_path, None, ['kvstore.master.metadata="redis"', f'redis.url="{url}"'])
        assert proc.returncode == 0, proc.stderr
        ms = parse_manifests(proc.stdout)
        token_file = tmp_path / "token"  # the Secret, as the pods see it mounted
        token_file.write_text(_token(ms))
        master_config = _role_config(ms, "Deployment", "kvstore-master",
                                     token_file=str(token_file))
        assert master_config.metadata == url
        master = start_master(master_config)
        try:
            address = f"127.0.0.1:{master.port}"
            node_config = _role_config(
                ms, "StatefulSet", "kvstore-node", master_address=address, tcp_port=0,
                shm_dir=str(tmp_path), dram_bytes=4 << 20, prefault=False,
                token_file=str(token_file))
            assert node_config.node_id == "t-pantry-x-0"
            node = start_node(node_config)
            try:
                with redis.Redis.from_url(url, decode_responses=True) as r:
                    # The master writes its records to Redis after answering the registration.
                    wait_for(lambda: list(r.hgetall(NODES)) == ["t-pantry-x-0"],
                             what="the node's record in Redis")
                monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))  # as the engines get it
                with KVStoreClient(address) as engine_client:
                    status = engine_client.status()
                assert ([n.node.node_id for n in status.nodes], status.capacity_bytes) == (
                    ["t-pantry-x-0"], 4 << 20)
                with KVStoreClient(address, token="") as stranger:
                    with pytest.raises(grpc.RpcError) as e:
                        stranger.status()
                assert (e.value.code(), e.value.details()) == (
                    grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            finally:
                node.stop()
        finally:
            master.stop()
    finally:
        redis_server.stop()
