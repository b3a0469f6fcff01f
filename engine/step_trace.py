"""An engine loop's step trace: one JSON line per step (a decode step, a prefill pass), for finding
what made a token late.

Time between tokens is a step's wall time, and a step is slow for one of a few reasons that
look alike from outside: more work (a prompt's tokens in the batch, a long context), slower
work (the same instructions taking longer: memory bandwidth or caches shared with another
process, a busy host), or waiting (for the GIL held by another of the engine's threads, for a
CPU). Each line separates them:

    {"engine": "decode-0", "t": 812.41, "wall_ms": 57.9, "cpu_ms": 37.2, "runq_ms": 17.0,
     "sequences": 4, "tokens": 4, "positions": 2380, "pulling": 1, "confined": true,
     "threads": {"decode-pull_0:8217": 10.8}}

- `engine`: the engine's id (engines may share a file);
- `t`: the step's start (time.perf_counter, CLOCK_MONOTONIC: comparable across processes);
- `cpu_ms`: the loop thread's own CPU time in the step; `runq_ms`: its time runnable but not
  running (the kernel's schedstat); the rest of `wall_ms` it was off its CPU, waiting;
- `sequences`, `tokens`, `positions`: the batch, its new tokens and its total context;
  `confined`: whether the CPU split gave the engine only its own half (null without a split);
  decode adds `pulling` (sequences whose prompt is being pulled), prefill `stored` (blocks,
  tails included, the pass handed to the writer), `finished` (prompts whose first token it
  gave) and `waiting` (prompts queued behind);
- `threads`: the engine's other threads that used at least 1 ms of CPU since the last step,
  by name and id (a pull's copies, write-back, the gRPC server; "native" for threads Python
  did not start, such as OpenMP's).

Off unless asked for (`pantry decode --step-trace FILE`, `pantry prefill --step-trace FILE`):
listing the threads costs ~0.3 ms a step. Linux only (/proc); elsewhere `runq_ms` and `threads`
are left out.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import IO

_SCHEDSTAT = "/proc/thread-self/schedstat"
# Threads that used less CPU than this since the last step are left out of a line.
THREAD_MIN_MS = 1.0


@dataclass(frozen=True)
class StepMark:
    """Where a step started: wall clock, the loop thread's CPU and run-queue clocks."""

    wall: float
    cpu: float
    runq_ns: int | None


def _runq_ns() -> int | None:
    try:
        with open(_SCHEDSTAT) as f:
            return int(f.read().split()[1])
    except OSError:
        return None


def _thread_cpu_ns() -> dict[int, int]:
    """CPU time of each thread of this process, by native id."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError):
            continue  # exited since the listing
    return out


class StepTrace:
    """Appends one line per step to `path` (line-buffered, so a crash loses at most one)."""

    def __init__(self, path: str, engine_id: str) -> None:
        self._engine_id = engine_id
        self._file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._threads = _thread_cpu_ns()
        self._loop = 0

    def begin(self) -> StepMark:
        """Called by the loop thread as a step starts."""
        self._loop = threading.get_native_id()
        return StepMark(time.perf_counter(), time.thread_time(), _runq_ns())

    def end(self, mark: StepMark, **batch: object) -> None:
        """Called by the loop thread as the step ends; `batch` (the engine's own fields, JSON
        values) goes between the clocks and the threads."""
        wall = time.perf_counter() - mark.wall
        cpu = time.thread_time() - mark.cpu
        line: dict[str, object] = {
            "engine": self._engine_id, "t": round(mark.wall, 4), "wall_ms": round(wall * 1e3, 2),
            "cpu_ms": round(cpu * 1e3, 2)}
        runq = _runq_ns()
        if runq is not None and mark.runq_ns is not None:
            line["runq_ms"] = round((runq - mark.runq_ns) / 1e6, 2)
        line.update(batch)
        now = _thread_cpu_ns()  # a thread started since the last step counts all its CPU
        if now:
            names = {t.native_id: t.name for t in threading.enumerate()}
            used = {f"{names.get(tid, 'native')}:{tid}": round((ns - self._threads.get(tid, 0))
                                                              / 1e6, 1)
                    for tid, ns in now.items() if tid != self._loop}
            line["threads"] = {k: v for k, v in sorted(used.items()) if v >= THREAD_MIN_MS}
            self._threads = now
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()
