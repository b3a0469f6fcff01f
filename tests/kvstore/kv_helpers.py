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
