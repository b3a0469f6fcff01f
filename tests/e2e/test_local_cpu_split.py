"""`pantry local`'s CPU split, read back from the running engine processes: by default every
engine may use every CPU, their OpenMP threads wait passively, and prefill runs at nice 10
(under SCHED_IDLE too with `--prefill-idle`), decode's threads spin first with `--decode-spin`;
`--pin` gives each role its own CPUs instead."""

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


def threads_flag(pid: int) -> str:
    """The engine's --threads as it parses it: the last one on its command line wins."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--threads"][-1]


Split = tuple[int, int, frozenset[int], tuple[str | None, str | None]]


def split_of(system: LocalSystem) -> dict[str, Split]:
    """Per engine: (its nice above ours, scheduling policy, CPUs, (OMP_WAIT_POLICY,
    GOMP_SPINCOUNT))."""
    out = {}
    for role in ("prefill", "decode"):
        pid = int(system.role(role)["pid"])
        env = environ(pid)
        out[role] = (nice_of(pid) - nice_of(0), os.sched_getscheduler(pid),
                     frozenset(os.sched_getaffinity(pid)),
                     (env.get("OMP_WAIT_POLICY"), env.get("GOMP_SPINCOUNT")))
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_default_shares_the_cpus_and_pin_splits_them(
        tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in os.environ:
            pytest.skip(f"{name} is set in this environment; the engines inherit it")
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("this test runs under a real-time or idle policy; the engines inherit it")
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    every = frozenset(cpus)
    other, idle = os.SCHED_OTHER, os.SCHED_IDLE
    args = ("--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB")
    passive = ("PASSIVE", None)
    expectations: list[tuple[tuple[str, ...], dict[str, Split]]] = [
        ((), {"prefill": (10, other, every, passive),
              "decode": (0, other, every, passive)}),
        (("--prefill-idle", "--decode-threads", "1", "--decode-spin", "1000"),
         {"prefill": (10, idle, every, passive),
          "decode": (0, other, every, ("PASSIVE", "1000"))}),
        # Pinned roles have CPUs of their own: nothing to yield to, --prefill-idle is moot.
        (("--pin", "--prefill-idle"), {"prefill": (0, other, frozenset(cpus[:half]), (None, None)),
                                       "decode": (0, other, frozenset(cpus[half:]), (None, None))}),
    ]
    for extra, expected in expectations:
        system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("cpu-split"),
                             *args, *extra)
        try:
            assert split_of(system) == expected
            decode_threads = "1" if "--decode-threads" in extra else "0"
            assert threads_flag(int(system.role("decode")["pid"])) == decode_threads
            assert threads_flag(int(system.role("prefill")["pid"])) == "0"
            # The engines serve under every split.
            out = system.complete(list(range(10, 50)), 3)
            assert out["usage"]["completion_tokens"] == 3
        finally:
            stop_local(system)
