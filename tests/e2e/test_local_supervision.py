"""`pantry local` supervises its roles: one dying takes the system down cleanly, and a killed
storage node's shared memory does not outlive it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e.local_system import start_local


def test_killed_node_stops_everything_and_leaves_no_segment(
        tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> None:
    system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("sys-kill"),
                         "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB")
    node_pid = system.role("kv-node")["pid"]
    segment = Path(f"/dev/shm/pantry-kv-node-0-{node_pid}")
    assert segment.exists()
    system.complete(list(range(10, 50)), 2)  # something stored in it
    os.kill(node_pid, signal.SIGKILL)  # no chance to clean up
    assert system.proc.wait(timeout=60) == 1
    assert not segment.exists()
    for role in system.info["roles"].values():
        path = Path(f"/proc/{role['pid']}/stat")
        assert not path.exists() or path.read_text().split()[2] == "Z", role


def test_wrong_model_fails_before_any_role_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pantry", "local", "--model",
                          str(tmp_path / "missing"), "--http-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "pantry local: model" in res.stderr and "not found" in res.stderr
    assert "Traceback" not in res.stderr
    assert "started" not in res.stderr
