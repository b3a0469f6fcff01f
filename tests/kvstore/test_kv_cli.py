"""The `kvstore` CLI as real processes: master + node with ready files, put/get/status/ls/rm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_helpers import ROOT, sample, scrape, shm_files, spawn, wait_for

from kvstore.cli import build_parser, master_config, node_config
from kvstore.config import MasterConfig, NodeConfig
from pantry.common.config_flags import KIB, MIB


def kv(*args: str, timeout: float = 20, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    return out.decode()


Cluster = tuple[str, str, subprocess.Popen[bytes], dict[str, object], dict[str, object]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    master, minfo = spawn(tmp_path, "master", "master", "--host", "127.0.0.1", "--port", "0",
                          "--metrics-port", "0", "--max-object-bytes", "1MiB")
    addr = str(minfo["address"])
    node_id = f"cli-{os.getpid()}"
    node, ninfo = spawn(tmp_path, "node", "node", "--master", addr, "--port", "0",
                        "--dram-bytes", "16MiB", "--node-id", node_id, "--heartbeat", "0.2",
                        "--max-object-bytes", "1MiB")
    try:
        yield addr, node_id, node, minfo, ninfo
    finally:
        for p in (node, master):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_cli_roundtrip_and_sigterm_cleanup(cluster: Cluster, tmp_path: Path) -> None:
    addr, node_id, node, minfo, ninfo = cluster
    assert len(shm_files(node_id)) == 1
    wait_for(lambda: node_id in kv("status", "--master", addr).stdout.decode(),
             what="node in status")
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(10_000))
    r = kv("put", "--master", addr, "k1", str(src))
    assert r.returncode == 0, r.stderr.decode()
    out = tmp_path / "out.bin"
    r = kv("get", "--master", addr, "k1", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == src.read_bytes()
    r = kv("get", "--master", addr, "nope")
    assert r.returncode == 1 and r.stdout == b"" and b"miss" in r.stderr

    status = kv("status", "--master", addr).stdout.decode()
    assert "16.0 MiB" in status and "objects 1" in status, status
    listing = kv("ls", "--master", addr).stdout.decode()
    # The stored object is the file behind a 64-byte header that names its key and layout.
    assert "k1" in listing and "10064" in listing and "sealed" in listing, listing
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (1 * MIB + 1))
    r = kv("put", "--master", addr, "big", str(big))
    assert (r.returncode, r.stderr) == (2, b"kvstore: error: master rejected big as larger "
                                           b"than its max_object_bytes 1048576\n")

    m = scrape(str(minfo["metrics"]))
    assert sample(m, "pantry_kv_master_puts_sealed_total") == 1
    assert sample(m, "pantry_kv_master_hits_total") == 1
    assert sample(m, "pantry_kv_master_misses_total") == 1
    assert sample(m, "pantry_kv_master_used_bytes") == 10_112  # 10,064 B in a 128 B granule
    assert sample(scrape(str(ninfo["metrics"])),
                  "pantry_kv_node_segment_capacity_bytes") == 16 * MIB

    assert kv("rm", "--master", addr, "k1").returncode == 0
    assert kv("get", "--master", addr, "k1").returncode == 1

    log = stop(node)
    assert "unlinked" in log
    assert shm_files(node_id) == []


@pytest.mark.slow
def test_cli_sigint_and_errors(cluster: Cluster) -> None:
    addr, node_id, node, _, _ = cluster
    stop(node, signal.SIGINT)
    assert shm_files(node_id) == []
    r = kv("status", "--master", "127.0.0.1:1", "--timeout", "0.5")
    assert r.returncode == 3 and b"rpc failed" in r.stderr
    r = kv("node", "--master", addr, "--node-id", "x", "--dram-bytes", "lots")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [
        "kvstore node: error: argument --dram-bytes: not a size: 'lots' "
        "(use e.g. 4096, 64KiB, 256MiB, 1GiB)"]
    r = kv("master", "--port", "70000")
    assert (r.returncode, r.stderr) == (2, b"kvstore: error: port must be in [0, 65535], "
                                           b"got 70000\n")
    r = kv("node", "--node-id", "x")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [
        "kvstore node: error: the following arguments are required: --master"]


def test_role_flags_build_the_config() -> None:
    ns = build_parser().parse_args([
        "node", "--master", "10.0.0.1:7000", "--node-id", "node-0", "--dram-bytes", "1GiB",
        "--host", "0.0.0.0", "--port", "7001", "--host-id", "h1", "--heartbeat", "0.5",
        "--max-object-bytes", "64KiB", "--no-prefault", "--no-tcp", "--metrics-port", "9101",
        "--ready-file", "r.json", "--grace", "3"])
    assert node_config(ns) == NodeConfig(
        master_address="10.0.0.1:7000", node_id="node-0", dram_bytes=1024 * MIB,
        host="0.0.0.0", port=7001, host_id="h1", heartbeat_s=0.5, max_object_bytes=64 * KIB,
        prefault=False, tcp_port=None, metrics_port=9101)
    assert (ns.ready_file, ns.grace) == ("r.json", 3.0)
    ns = build_parser().parse_args(["node", "--master", "m:1", "--node-id", "n",
                                    "--tcp-port", "7100"])
    assert node_config(ns) == NodeConfig(master_address="m:1", node_id="n", tcp_port=7100)
    ns = build_parser().parse_args([
        "master", "--host", "0.0.0.0", "--port", "7000", "--node-timeout", "4",
        "--put-timeout", "8", "--lease-ms", "250", "--max-object-bytes", "1GiB",
        "--min-slot-bytes", "64KiB", "--high-watermark", "0.7", "--low-watermark", "0.6",
        "--reap-interval", "0.5", "--metrics-port", "9100"])
    assert master_config(ns) == MasterConfig(
        host="0.0.0.0", port=7000, node_timeout_s=4.0, put_timeout_s=8.0, lease_ms=250,
        max_object_bytes=1024 * MIB, min_slot_bytes=64 * KIB, high_watermark=0.7,
        low_watermark=0.6, reap_interval_s=0.5, metrics_port=9100)
    assert master_config(build_parser().parse_args(["master"])) == MasterConfig()


def test_metadata_and_token_flags_build_the_config() -> None:
    ns = build_parser().parse_args(["master", "--metadata", "redis://10.0.0.2:6379/3",
                                    "--token-file", "/run/pantry/token"])
    assert master_config(ns) == MasterConfig(metadata="redis://10.0.0.2:6379/3",
                                             token_file="/run/pantry/token")
    ns = build_parser().parse_args(["node", "--master", "m:1", "--node-id", "n",
                                    "--token-file", "t"])
    assert node_config(ns) == NodeConfig(master_address="m:1", node_id="n", token_file="t")
    bad = kv("master", "--metadata", "etcd://h:1")
    assert (bad.returncode, bad.stderr.decode()) == (
        2, "kvstore: error: metadata must be 'memory' or redis://HOST:PORT/DB, got "
           "'etcd://h:1'\n")
