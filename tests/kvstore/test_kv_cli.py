"""The `kvstore` CLI as real processes: master + node with ready files, put/get/status/ls/rm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_helpers import shm_files, wait_for

ROOT = Path(__file__).resolve().parents[2]


def kv(*args: str, timeout: float = 20, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def spawn(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    ready = tmp / f"{name}.json"
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", *args, "--ready-file", str(ready)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=20, what=f"{name} ready")
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return proc, info


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    master, minfo = spawn(tmp_path, "master", "master", "--host", "127.0.0.1", "--port", "0")
    addr = str(minfo["address"])
    node_id = f"cli-{os.getpid()}"
    node, _ = spawn(tmp_path, "node", "node", "--master", addr, "--port", "0",
                    "--dram-bytes", "16MiB", "--node-id", node_id, "--heartbeat", "0.2")
    try:
        yield addr, node_id, node
    finally:
        for p in (node, master):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cli_roundtrip_and_sigterm_cleanup(
    cluster: tuple[str, str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    addr, node_id, node = cluster
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
    assert "k1" in listing and "10000" in listing and "sealed" in listing, listing

    assert kv("rm", "--master", addr, "k1").returncode == 0
    assert kv("get", "--master", addr, "k1").returncode == 1

    log = stop(node)
    assert "unlinked" in log
    assert shm_files(node_id) == []


def test_cli_sigint_and_errors(cluster: tuple[str, str, subprocess.Popen[bytes]]) -> None:
    addr, node_id, node = cluster
    stop(node, signal.SIGINT)
    assert shm_files(node_id) == []
    r = kv("status", "--master", "127.0.0.1:1", "--timeout", "0.5")
    assert r.returncode == 3 and b"rpc failed" in r.stderr
    r = kv("node", "--master", addr, "--node-id", "x", "--dram-bytes", "lots")
    assert r.returncode == 2 and b"not a size" in r.stderr
