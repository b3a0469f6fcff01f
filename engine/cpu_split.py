"""Which CPUs an engine computes on when prefill and decode share one machine's CPUs.

`pantry local` runs both roles on the same few cores. Measured on 2 cores (bench/cpu_split.py,
bench/interference.py):
- a role alone is fastest on every core: pinning each role to one core halves a lone cold
  prompt's prefill and decode's tok/s with nothing else running;
- with both computing, one core each beats sharing every core on every measure. While prompts
  of 2k-4k tokens arrive under four decoding streams, TBT p50 30.5 against 33.5 ms, p99 47-49
  against 53 ms, the prompts' TTFT p50 30-32 against 33-35 s, the streams' tok/s 118 against 108:
  two roles' threads sharing cores take turns at every OpenMP region and wait for each other.

So an engine here is adaptive: it computes on its own share of the CPUs while an engine of the
other role computes, and on every CPU while none does. The engines tell each other through a
`CpuBoard`, a small shared file with one byte per engine ("computing now"), which `pantry local`
creates: no messages, no process watching the others; each engine reads the board where it
would switch anyway (decode before each step, prefill before each pass and between layers) and
changes only itself.

The loop's compute threads (OpenMP's, the C pool's helpers: every thread that is not Python's)
follow the loop. While confined, decode also moves its process's other Python threads onto the
other role's CPUs: pulls from the pool (a memcpy and a checksum of each block), write-back and
gRPC threads then cost prefill a little rather than stalling decode's steps (for the core, and
for the GIL each time a step asks for it back), as a NIC's DMA would on machines of their own.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The board: a magic, the number of engines, one role letter per engine, then one state byte
# per engine (1: computing).
_MAGIC = b"PCPU"
_ROLES = {"prefill": ord("p"), "decode": ord("d")}
_MAX_ENGINES = 255
# How often a confined engine re-applies its background CPUs: threads started since (a pool's
# worker started lazily by the loop inherits the loop's CPUs) are moved too.
RESCAN_S = 1.0


class CpuBoardError(ValueError):
    """The board file is missing, not a board, or has no such engine slot."""


class CpuBoard:
    """One engine's view of the shared board: its own slot to write, everyone's to read."""

    def __init__(self, path: str | Path, slot: int) -> None:
        try:
            with open(path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), 0)
        except (OSError, ValueError) as exc:
            raise CpuBoardError(f"cpu board {path}: {exc}") from exc
        if self._map[:4] != _MAGIC:
            raise CpuBoardError(f"cpu board {path}: not a board (written by `pantry local`)")
        self.engines = self._map[4]
        if not 0 <= slot < self.engines:
            raise CpuBoardError(f"cpu board {path} has {self.engines} slots; no slot {slot}")
        self.slot = slot
        self._roles = bytes(self._map[5 : 5 + self.engines])
        self._states = 5 + self.engines

    @staticmethod
    def create(path: str | Path, roles: Sequence[str]) -> None:
        """A board for these engines (one role each, slot = index), every one idle."""
        assert 0 < len(roles) <= _MAX_ENGINES
        codes = bytes(_ROLES[r] for r in roles)
        Path(path).write_bytes(_MAGIC + bytes([len(roles)]) + codes + bytes(len(roles)))

    def set_computing(self, computing: bool) -> None:
        self._map[self._states + self.slot] = int(computing)

    def other_role_computing(self) -> bool:
        """Whether any engine of another role than this slot's says it is computing."""
        mine = self._roles[self.slot]
        states = self._map[self._states : self._states + self.engines]
        return any(state and role != mine for role, state in zip(self._roles, states, strict=True))

    def close(self) -> None:
        self._map.close()


def compute_threads(count: int) -> None:
    """The calling thread's compute threads: torch's intra-op threads and the C kernels' pool."""
    import torch

    from engine import cpu_pool

    torch.set_num_threads(count)
    if cpu_pool.available():
        cpu_pool.set_threads(count)


def far_helpers(count: int) -> list[int]:
    """The C pool's far helpers switched on (`count`; 0: off, left asleep), by kernel thread
    id; none without the pool."""
    from engine import cpu_pool

    return cpu_pool.set_far_helpers(count) if cpu_pool.available() else []


def thread_ids() -> list[int]:
    """Every thread of this process, by kernel thread id."""
    return [int(tid) for tid in os.listdir("/proc/self/task")]


class AdaptiveCpus:
    """Called on an engine's loop thread: `poll(computing)` where the engine may switch. It
    writes the engine's state to the board and, when the other role's state changes what this
    engine should use, moves its threads and resizes its thread pools.

    `set_threads(n)` resizes the loop's compute threads (torch's and the engine's C pool); it
    runs on the loop thread after the loop's own CPUs are set, so threads it starts inherit
    them. `background_away`: while confined, every other thread of the process goes to the CPUs
    this engine is not given (decode); otherwise they stay with the loop (prefill). With them,
    `set_far(n)` switches on n far helpers of the C pool (returning their thread ids) while
    confined, one per CPU it is not given, and off when not: they take spans of a long
    sequence's attention on the other role's CPUs, only while that work waits
    (engine.cpu_pool)."""

    def __init__(self, board: CpuBoard, own: Sequence[int], every: Sequence[int],
                 set_threads: Callable[[int], None] | None = None, *, threads: int = 0,
                 background_away: bool = False,
                 on_switch: Callable[[], None] | None = None,
                 set_far: Callable[[int], list[int]] | None = None) -> None:
        self.board = board
        self.own = frozenset(own)
        self.every = frozenset(every)
        assert self.own and self.own <= self.every, (own, every)
        self._set_threads = set_threads or compute_threads
        self._threads = threads  # 0: one per CPU in use
        self._away = background_away and self.every != self.own
        self._set_far = set_far or far_helpers
        self._far: frozenset[int] = frozenset()  # the far helpers' thread ids
        self.confined: bool | None = None  # None until the first poll applies a state
        self.switches = 0
        self._on_switch = on_switch
        self._placed = 0.0

    def poll(self, computing: bool) -> None:
        self.board.set_computing(computing)
        if not computing:
            return  # nothing runs until the next poll; switch then
        confined = self.board.other_role_computing()
        if confined != self.confined:
            self._apply(confined)
        elif confined and self._away and time.monotonic() - self._placed > RESCAN_S:
            self._place(self.own, self.every - self.own)

    def _apply(self, confined: bool) -> None:
        cpus = self.own if confined else self.every
        if self._away:
            self._far = frozenset(self._set_far(len(self.every - self.own) if confined else 0))
        self._place(cpus, self.every - self.own if confined and self._away else cpus)
        count = len(cpus) if not self._threads else min(self._threads, len(cpus))
        self._set_threads(count)
        if self.confined is not None:
            self.switches += 1
            if self._on_switch is not None:
                self._on_switch()
        self.confined = confined

    @property
    def cpus_in_use(self) -> int:
        return len(self.own if self.confined else self.every)

    def _place(self, compute: frozenset[int], background: frozenset[int]) -> None:
        """The loop and every thread that is not Python's (OpenMP's, the C pool's helpers:
        the loop's compute) on `compute`; the process's other Python threads (pulls,
        write-back, servers) and the pool's far helpers on `background`."""
        self._placed = time.monotonic()
        loop = threading.get_native_id()
        python = ({t.native_id for t in threading.enumerate()} - {loop}) | self._far
        for tid in thread_ids():
            try:
                os.sched_setaffinity(tid, background if tid in python else compute)
            except (ProcessLookupError, PermissionError):
                pass  # the thread has exited since the listing
