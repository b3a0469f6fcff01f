"""`pantry local`'s CPU split, read back from the running engine processes: by default every
engine may use every CPU, their OpenMP threads wait passively, and prefill runs at a lower
priority than decode; `--pin` gives each role its own CPUs instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.local_system import LocalSystem, start_local, stop_local


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def nice_of(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def split_of(system: LocalSystem) -> dict[str, tuple[int, frozenset[int], str | None]]:
    out = {}
    for role in ("prefill", "decode"):
        pid = int(system.role(role)["pid"])
        out[role] = (nice_of(pid) - nice_of(0), frozenset(os.sched_getaffinity(pid)),
                     environ(pid).get("OMP_WAIT_POLICY"))
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_default_shares_the_cpus_and_pin_splits_them(
        tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> None:
    if "OMP_WAIT_POLICY" in os.environ:
        pytest.skip("OMP_WAIT_POLICY is set in this environment; the engines inherit it")
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    args = ("--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB")
    for extra, expected in [
        ((), {"prefill": (10, frozenset(cpus), "PASSIVE"),
              "decode": (0, frozenset(cpus), "PASSIVE")}),
        (("--pin",), {"prefill": (0, frozenset(cpus[:half]), None),
                      "decode": (0, frozenset(cpus[half:]), None)}),
    ]:
        system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("cpu-split"),
                             *args, *extra)
        try:
            assert split_of(system) == expected
            # The engines serve under either split.
            out = system.complete(list(range(10, 50)), 3)
            assert out["usage"]["completion_tokens"] == 3
        finally:
            stop_local(system)
