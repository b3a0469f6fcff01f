"""Helpers shared by the kvstore tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import glob
import time
from collections.abc import Callable


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def shm_files(node_id: str) -> list[str]:
    return glob.glob(f"/dev/shm/pantry-kv-{node_id}-*")
