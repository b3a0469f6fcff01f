"""Bad values fail `helm template` with a message naming the value: the schema's checks and
values that contradict each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.chart_rig import template

SCHEMA_ERROR = ("Error: values don't meet the specifications of the schema(s) in the following "
                "chart(s):\npantry:\n")
BAD_VALUES = {
    "zero prefill engines": (
        ["prefill.replicas=0"], "- at '/prefill/replicas': minimum: got 0, want 1"),
    "zero decode engines": (
        ["decode.replicas=0"], "- at '/decode/replicas': minimum: got 0, want 1"),
    "zero storage nodes": (
        ["kvstore.node.replicas=0"], "- at '/kvstore/node/replicas': minimum: got 0, want 1"),
    "no model source": (["model.source=null"], "- at '/model': missing property 'source'"),
    "unknown model source": (
        ['model.source="s3"'],
        "- at '/model/source': value must be one of 'embedded', 'pvc', 'hostPath'"),
    "pvc without a claim": (
        ['model={"source": "pvc", "path": "m", "pvc": {"claimName": ""}}'],
        "- at '/model': 'allOf' failed\n"
        "  - at '/model/pvc/claimName': minLength: got 0, want 1"),
    "pvc without a path": (
        ['model={"source": "pvc", "path": "", "pvc": {"claimName": "models"}}'],
        "- at '/model': 'allOf' failed\n  - at '/model/path': minLength: got 0, want 1"),
    "relative hostPath": (
        ['model={"source": "hostPath", "path": "m", "hostPath": {"path": "srv"}}'],
        "- at '/model': 'allOf' failed\n"
        "  - at '/model/hostPath/path': 'srv' does not match pattern '^/'"),
    "negative memory size": (
        ['kvstore.node.dram="-1Gi"'],
        "- at '/kvstore/node/dram': '-1Gi' does not match pattern '^[1-9][0-9]*(Ki|Mi|Gi)?$'"),
    "unparsable memory size": (
        ['prefill.kvCacheBytes="lots"'],
        "- at '/prefill/kvCacheBytes': 'lots' does not match pattern "
        "'^[1-9][0-9]*(Ki|Mi|Gi)?$'"),
    "fractional memory size": (
        ['decode.kvCacheBytes="1.5Gi"'],
        "- at '/decode/kvCacheBytes': '1.5Gi' does not match pattern "
        "'^[1-9][0-9]*(Ki|Mi|Gi)?$'"),
    "unknown transport": (
        ['kvstore.transport="rdma"'],
        "- at '/kvstore/transport': value must be one of 'tcp', 'grpc', 'shm'"),
    "redis url of another scheme": (
        ['redis.url="rediss://redis:6379/0"'],
        "- at '/redis/url': 'rediss://redis:6379/0' does not match pattern "
        "'^$|^redis://[^/]+(/[0-9]+)?$'"),
    "short token": (
        ['auth.token="short"'],
        "- at '/auth/token': 'short' does not match pattern '^$|^[!-~]{16,}$'"),
    "token with a space": (
        ['auth.token="a token with spaces in it"'],
        "- at '/auth/token': 'a token with spaces in it' does not match pattern "
        "'^$|^[!-~]{16,}$'"),
    "zero object replicas": (
        ["kvstore.master.replicas=0"], "- at '/kvstore/master/replicas': minimum: got 0, want 1"),
    "nine object replicas": (
        ["kvstore.master.replicas=9"], "- at '/kvstore/master/replicas': maximum: got 9, want 8"),
    "one standby master": (
        ["kvstore.master.standby.masters=1"],
        "- at '/kvstore/master/standby/masters': minimum: got 1, want 2"),
    "unknown ssd volume": (
        ['kvstore.node.ssd.volume="nfs"'],
        "- at '/kvstore/node/ssd/volume': value must be one of 'emptyDir', "
        "'persistentVolumeClaim', 'hostPath'"),
    "relative ssd hostPath": (
        ['kvstore.node.ssd.hostPath="nvme"'],
        "- at '/kvstore/node/ssd/hostPath': 'nvme' does not match pattern '^$|^/'"),
    "spill watermark above 1": (
        ["kvstore.master.spillWatermark=1.5"],
        "- at '/kvstore/master/spillWatermark': maximum: got 1.5, want 1"),
    "misspelt key": (
        ["prefill.replica=2"], "- at '/prefill': additional properties 'replica' not allowed"),
}
GATED = {
    "redis metadata without a redis": (
        ['kvstore.master.metadata="redis"'],
        "kvstore.master.metadata: 'redis' needs a Redis: redis.enabled (the bundled one) or "
        "redis.url (redis://HOST:PORT/DB)"),
    "two redises": (
        ['kvstore.master.metadata="redis"', "redis.enabled=true",
         'redis.url="redis://redis:6379/0"'],
        "redis.url: set with redis.enabled; the master uses one Redis, the bundled one or "
        "redis.url"),
    "bundled redis with memory metadata": (
        ["redis.enabled=true"],
        "redis.enabled: the bundled Redis is used only with kvstore.master.metadata: redis"),
    "external redis with memory metadata": (
        ['redis.url="redis://redis:6379/0"'],
        "redis.url: an external Redis is used only with kvstore.master.metadata: redis"),
    "standby masters with memory metadata": (
        ["kvstore.master.standby.enabled=true"],
        "kvstore.master.standby.enabled: standby masters share the pool's records and the "
        "leader lease through Redis; set kvstore.master.metadata: redis (with redis.enabled or "
        "redis.url)"),
    "lease renewed too rarely": (
        ["kvstore.master.leaderLease.renewSeconds=1.5"],
        "kvstore.master.leaderLease.renewSeconds: 1.5 is more than a third of ttlSeconds 3; one "
        "lost renewal would cost the lease"),
    "ssd watermarks": (
        ["kvstore.node.ssd.enabled=true", "kvstore.node.ssd.lowWatermark=0.99"],
        "kvstore.node.ssd.lowWatermark: 0.99 is above kvstore.node.ssd.highWatermark 0.95; SSD "
        "eviction brings use down to the low mark"),
    "ssd claim on a daemonset": (
        ["kvstore.node.ssd.enabled=true", 'kvstore.node.ssd.volume="persistentVolumeClaim"',
         'kvstore.node.kind="DaemonSet"'],
        "kvstore.node.ssd.volume: persistentVolumeClaim needs kvstore.node.kind: StatefulSet (one "
        "claim per node pod); a DaemonSet keeps its files with volume: hostPath"),
    "ssd hostPath on a statefulset": (
        ["kvstore.node.ssd.enabled=true", 'kvstore.node.ssd.volume="hostPath"',
         'kvstore.node.ssd.hostPath="/mnt/nvme"'],
        "kvstore.node.ssd.volume: hostPath needs kvstore.node.kind: DaemonSet (one node pod per "
        "host owns the directory); a StatefulSet keeps its files with volume: "
        "persistentVolumeClaim"),
    "ssd hostPath without a path": (
        ["kvstore.node.ssd.enabled=true", 'kvstore.node.ssd.volume="hostPath"',
         'kvstore.node.kind="DaemonSet"'],
        "kvstore.node.ssd.hostPath: volume: hostPath needs the directory on the host, e.g. "
        "/mnt/nvme/pantry"),
    "two tokens": (
        ['auth.token="0123456789abcdefgh"', 'auth.existingSecret="mine"'],
        "auth.token: set with auth.existingSecret; the token comes from one of them"),
    "watermarks": (
        ["kvstore.master.lowWatermark=0.95"],
        "kvstore.master.lowWatermark: 0.95 is above kvstore.master.highWatermark 0.9; "
        "eviction brings use down to the low mark"),
}


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_fails_with_a_message_naming_it(case: str, helm_home: Path) -> None:
    set_json, message = BAD_VALUES[case]
    proc = template(helm_home, set_json=set_json)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.strip() == SCHEMA_ERROR + message


@pytest.mark.parametrize("case", list(GATED))
def test_what_the_code_lacks_or_contradicts_fails_naming_the_value(
        case: str, helm_home: Path) -> None:
    set_json, message = GATED[case]
    proc = template(helm_home, set_json=set_json)
    assert (proc.returncode, proc.stdout) == (1, "")
    (first, *_rest) = proc.stderr.splitlines()
    assert first.startswith("Error: execution error at (pantry/templates/gates.yaml:"), first
    assert first.split("): ", 1)[1] == message
