"""Helpers shared by the kvstore tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import glob
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


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
