"""`kvstore bench` against a small in-process pool: what it stores, reads and reports, from
DRAM and from the copies the nodes spilled to their SSD tiers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kv_helpers import wait_for

from kvstore.cli import main
from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig, NodeConfig
from kvstore.master_service import start_master
from kvstore.node_service import NodeServer, start_node
from pantry.common.config_flags import KIB, MIB


@pytest.mark.parametrize(("transport", "host"), [("shm", "host-a"), ("tcp", ""), ("grpc", "")])
def test_bench_json_reports_what_it_moved(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        master_address: str, capsys: pytest.CaptureFixture[str], transport: str,
        host: str) -> None:
    node_factory("n")
    args = ["bench", "--master", master_address, "--object-size", "64KiB", "--count", "9",
            "--transport", transport, "--json"]
    assert main(args + (["--host-id", host] if host else [])) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("transport", "tier", "object_size", "count", "stored", "hits",
                                "put_bytes", "get_bytes", "transports")} == {
        "transport": transport, "tier": "dram", "object_size": 64 * KIB, "count": 9,
        "stored": 9, "hits": 9, "put_bytes": 9 * 64 * KIB, "get_bytes": 9 * 64 * KIB,
        "transports": [transport]}
    assert out["put_gb_per_s"] > 0 and out["get_gb_per_s"] > 0
    assert out["put_seconds"] > 0 and out["get_seconds"] > 0
    # It cleans up after itself.
    assert client_factory().status().objects == 0


def test_bench_table_and_clear_errors(
        node_factory: Callable[..., NodeServer], master_address: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    node_factory("n")
    base = ["bench", "--master", master_address, "--object-size", "4KiB", "--count", "3"]
    assert main(base) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TRANSPORT", "TIER", "OBJECT", "STORED", "HITS", "PUT", "GB/s",
                                "GET", "GB/s"]
    assert table[2].split()[:6] == ["tcp", "dram", "4.0", "KiB", "3/3", "3"]
    # This machine's host id is not the test node's: no node to reach over shm.
    assert main(base + ["--transport", "shm", "--host-id", "elsewhere"]) == 2
    assert "shm needs a node on this host (elsewhere); the pool's nodes are on ['host-a']" in (
        capsys.readouterr().err)
    assert main(["bench", "--master", master_address, "--count", "0"]) == 2
    assert "object size and count must be > 0" in capsys.readouterr().err


@pytest.fixture
def ssd_pool(tmp_path: Path) -> Iterator[str]:
    """A master that spills everything and never promotes, and a node on host-a with an SSD
    tier; the master's address."""
    master = start_master(MasterConfig(port=0, reap_interval_s=0.1, lease_ms=500,
                                       spill_watermark=0.001, promote_after_hits=0))
    address = f"127.0.0.1:{master.port}"
    node = start_node(NodeConfig(master_address=address, node_id=f"bs-{os.getpid()}",
                                 dram_bytes=8 * MIB, host_id="host-a", heartbeat_s=0.1,
                                 ssd_dir=str(tmp_path / "ssd"), ssd_bytes=16 * MIB))
    try:
        with KVStoreClient(address, host_id="probe") as c:
            wait_for(lambda: len(c.status().nodes) == 1, what="node registered")
        yield address
    finally:
        node.stop(grace=0)
        master.stop(grace=0)


@pytest.mark.parametrize(("transport", "host", "path"),
                         [("shm", "host-a", "file"), ("tcp", "", "grpc")])
def test_bench_reads_the_ssd_copies(ssd_pool: str, capsys: pytest.CaptureFixture[str],
                                    transport: str, host: str, path: str) -> None:
    args = ["bench", "--master", ssd_pool, "--object-size", "64KiB", "--count", "6",
            "--transport", transport, "--tier", "ssd", "--spill-wait", "20", "--json"]
    assert main(args + (["--host-id", host] if host else [])) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("transport", "tier", "stored", "hits", "get_bytes",
                                "transports")} == {
        "transport": transport, "tier": "ssd", "stored": 6, "hits": 6,
        "get_bytes": 6 * 64 * KIB, "transports": [path]}
    with KVStoreClient(ssd_pool, host_id="probe") as c:
        wait_for(lambda: c.status().objects == 0, what="the bench's objects removed")


def test_bench_ssd_needs_a_node_with_an_ssd_tier(
        node_factory: Callable[..., NodeServer], master_address: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    node_factory("n")
    assert main(["bench", "--master", master_address, "--object-size", "4KiB", "--count",
                 "2", "--tier", "ssd"]) == 2
    assert "tier ssd needs a node with an SSD tier (kvstore node --ssd-dir)" in (
        capsys.readouterr().err)
    with KVStoreClient(master_address, host_id="probe") as c:
        assert c.status().objects == 0
