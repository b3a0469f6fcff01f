"""`pantry local`'s CPU split, read back from the running engine processes: by default
(adaptive) an engine computes on every CPU while the other role is idle and on its own half
while it computes; unpinned engines' OpenMP threads wait passively, decode's threads spin first
with `--decode-spin`; `--cpu-split shared` never confines them and runs prefill at nice 10
(under SCHED_IDLE too with `--prefill-idle`), `--cpu-split pin` always confines them."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from engine import cpu_pool
from engine.cpu_split import CpuBoard
from pantry.common.sampling import SamplingParams
from pantry.common.wire import sampling_to_proto
from pantry.v1 import engine_pb2, engine_pb2_grpc
from tests.e2e.local_system import LocalSystem, start_local, stop_local


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def nice_of(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def cmdline_flag(pid: int, flag: str) -> str | None:
    """A flag's value as the process parses it (the last one wins); None without it."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    values = [argv[i + 1] for i, a in enumerate(argv) if a == flag]
    return values[-1] if values else None


def threads_flag(pid: int) -> str:
    value = cmdline_flag(pid, "--threads")
    assert value is not None
    return value


def thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Each thread of a process, by id, and the CPUs it may run on."""
    return {int(tid): frozenset(os.sched_getaffinity(int(tid)))
            for tid in os.listdir(f"/proc/{pid}/task")}


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
def test_each_split_sets_the_engines_cpus_priorities_and_waits(
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
        # Adaptive: at rest both on every CPU; --prefill-idle is for shared CPUs only.
        (("--prefill-idle",), {"prefill": (0, other, every, passive),
                               "decode": (0, other, every, passive)}),
        (("--cpu-split", "shared", "--prefill-idle", "--decode-threads", "1",
          "--decode-spin", "1000"),
         {"prefill": (10, idle, every, passive),
          "decode": (0, other, every, ("PASSIVE", "1000"))}),
        # Pinned roles have CPUs of their own: nothing to yield to, --prefill-idle is moot.
        (("--cpu-split", "pin", "--prefill-idle"),
         {"prefill": (0, other, frozenset(cpus[:half]), (None, None)),
          "decode": (0, other, frozenset(cpus[half:]), (None, None))}),
    ]
    for extra, expected in expectations:
        system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("cpu-split"),
                             *args, *extra)
        try:
            assert split_of(system) == expected
            boards = [cmdline_flag(int(system.role(r)["pid"]), "--cpu-board")
                      for r in ("prefill", "decode")]
            assert boards == ([boards[0]] * 2 if "--cpu-split" not in extra else [None, None])
            assert boards[0] is not None or "--cpu-split" in extra
            decode_threads = "1" if "--decode-threads" in extra else "0"
            assert threads_flag(int(system.role("decode")["pid"])) == decode_threads
            assert threads_flag(int(system.role("prefill")["pid"])) == "0"
            # The engines serve under every split.
            out = system.complete(list(range(10, 50)), 3)
            assert out["usage"]["completion_tokens"] == 3
        finally:
            stop_local(system)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_adaptive_split_confines_an_engine_while_the_other_role_computes(
        tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> None:
    """The test writes the other role's slot on the board itself ("computing"), then sends a
    request: the engine that computes it moves to its own half (decode's Python threads, its
    pulls and servers, to prefill's half), and back to every CPU once the slot is clear."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    every, prefill_cpus, decode_cpus = (frozenset(cpus), frozenset(cpus[:half]),
                                        frozenset(cpus[half:]))
    system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("adaptive"),
                         "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB")
    sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    try:
        pids = {r: int(system.role(r)["pid"]) for r in ("prefill", "decode")}
        path = cmdline_flag(pids["decode"], "--cpu-board")
        assert path is not None
        board = {"prefill": CpuBoard(path, 0), "decode": CpuBoard(path, 1)}
        channels = {r: grpc.insecure_channel(system.role(r)["address"])
                    for r in ("prefill", "decode")}
        decode = engine_pb2_grpc.DecodeEngineStub(channels["decode"])
        prefill = engine_pb2_grpc.PrefillEngineStub(channels["prefill"])

        # Each engine driven on its own, as the conductor would, so nothing else writes its
        # slot meanwhile: decode computes a short prompt itself, prefill a new prompt each time.
        def decoded() -> list[int]:
            chunks = decode.Decode(engine_pb2.DecodeRequest(
                request_id="d", token_ids=list(range(10, 20)), sampling=sampling), timeout=60)
            return [t for chunk in chunks for t in chunk.token_ids]

        def prefilled(first: int) -> int:
            return int(prefill.Prefill(engine_pb2.PrefillRequest(
                request_id="p", token_ids=list(range(first, first + 40)), sampling=sampling),
                timeout=60).first_token)

        def state(role: str) -> tuple[float, float]:
            """(CPUs it computes on, switches so far), from its /metrics."""
            m = system.metrics(role)
            labels = f'engine_id="{role}-0",role="{role}"'
            return (m[f"pantry_engine_compute_cpus{{{labels}}}"],
                    m[f"pantry_engine_cpu_switches_total{{{labels}}}"])

        # Each alone: every CPU.
        tokens = decoded()
        assert len(tokens) == 4
        prefilled(100)
        assert state("prefill") == state("decode") == (len(every), 0)

        # "Prefill computes": decode on its half, its Python threads on prefill's. Which
        # threads are Python's is not visible from here; the main thread is the loop.
        board["prefill"].set_computing(True)
        assert decoded() == tokens
        board["prefill"].set_computing(False)
        threads = thread_cpus(pids["decode"])
        assert threads[pids["decode"]] == decode_cpus
        assert set(threads.values()) == {decode_cpus, prefill_cpus}
        assert state("decode") == (len(decode_cpus), 1)
        # Its far helpers (on prefill's half) woke for no job: a 10-token context is far
        # under the attention kernel's FAR_POSITIONS. (No C pool where nothing compiles.)
        if cpu_pool.available():
            assert system.metrics("decode")[
                'pantry_engine_far_helper_blocks_total{engine_id="decode-0",role="decode"}'] == 0

        # "Decode computes": prefill on its half, every thread of it.
        board["decode"].set_computing(True)
        prefilled(200)
        board["decode"].set_computing(False)
        assert set(thread_cpus(pids["prefill"]).values()) == {prefill_cpus}
        assert state("prefill") == (len(prefill_cpus), 1)

        # Alone again: every CPU, every thread.
        assert decoded() == tokens
        prefilled(300)
        for role in ("prefill", "decode"):
            assert set(thread_cpus(pids[role]).values()) == {every}, role
            assert state(role) == (len(every), 2)
        for channel in channels.values():
            channel.close()
    finally:
        stop_local(system)
