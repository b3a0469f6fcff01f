"""Helpers shared by the kvstore tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.node_service import NodeServer

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Clock:
    """A clock that stands still until a test moves it (`clock.t += 5`), for a `Master`."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wait_registered(master_address: str, srv: NodeServer) -> None:
    """Until the master lists `srv` in its current registration. The node then knows its
    registration too, not just the master: before, a write could reach it before its grant
    key did."""
    from kvstore.client import KVStoreClient

    node_id = srv.node.config.node_id
    with KVStoreClient(master_address, host_id="probe") as c:
        wait_for(lambda: any(n.node.node_id == node_id and n.node.epoch == srv.node.epoch
                             for n in c.status().nodes), what=f"node {node_id} registered")


def raw_size(nbytes: int, key: str) -> int:
    """Bytes the pool stores for `nbytes` put as plain bytes under `key` (header + payload)."""
    from kvstore.block_object import RAW_DTYPE, RAW_FINGERPRINT, encoded_size

    return encoded_size(RAW_FINGERPRINT, RAW_DTYPE, (nbytes,), nbytes, key_chars=len(key))


def shm_files(node_id: str) -> list[str]:
    return glob.glob(f"/dev/shm/pantry-kv-{node_id}-*")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a real GET /metrics, keyed by (sample name, sorted labels)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    """A loopback port free now (for a process that must come back on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """`python -m kvstore ARGS --ready-file` as a real process, once it is serving."""
    ready = tmp / f"{name}.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", *args, "--ready-file", str(ready)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=20, what=f"{name} ready")
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return proc, info


ProcessPool = tuple[str, list[str], list[subprocess.Popen[bytes]]]


@contextmanager
def two_node_pool(tmp: Path, tag: str, node_timeout_s: float) -> Iterator[ProcessPool]:
    """A `kvstore master` (replicas 2, --node-timeout `node_timeout_s`) and two `kvstore node`
    processes on hosts host-a and host-b: (master address, node ids, processes, master first).
    Stopped with SIGTERM (a node unlinks its segment); the segment files of a node a test
    SIGKILLed are unlinked here."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    master, _ = spawn(tmp, "master", "master", "--port", str(port), "--reap-interval", "0.1",
                      "--node-timeout", str(node_timeout_s), "--replicas", "2")
    procs.append(master)
    ids = [f"{tag}-{x}-{os.getpid()}" for x in "ab"]
    try:
        for node_id, host in zip(ids, ("host-a", "host-b"), strict=True):
            proc, _ = spawn(tmp, node_id, "node", "--master", address, "--node-id", node_id,
                            "--dram-bytes", "8MiB", "--heartbeat", "0.2", "--host-id", host,
                            "--no-prefault")
            procs.append(proc)
        yield address, ids, procs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        for node_id in ids:
            for path in shm_files(node_id):
                os.unlink(path)


class RedisServer:
    """A real redis-server on a free loopback port, its files in `workdir`, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is installed by scripts/setup.sh"
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.workdir), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, what="redis-server answering")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
