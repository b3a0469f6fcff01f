"""The pool's events: what the master stored, removed and evicted, and which nodes came and went.

The master appends each event to a bounded ring under a sequence number that grows by one per
event in this master run; `run_id` names the run, so a watcher can tell a restart or a failover
(numbers start again at 1) from events it missed. A watcher resumes from a sequence number; when
the ring has dropped some of what it asks for, it is told how many (`EventLog.read`'s gap)
rather than silently skipping them. Appending never blocks the master on a watcher.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_CAPACITY = 65_536
DRAM = "dram"


class EventKind(enum.Enum):
    STORED = "stored"  # sealed by its writer, or taken back at recovery
    REMOVED = "removed"  # by request (kvstore rm)
    EVICTED = "evicted"  # to make room, by watermark, or by request (kvstore evict)
    NODE_JOINED = "node_joined"
    NODE_LEFT = "node_left"  # dropped: heartbeat timeout or re-registration


@dataclass(frozen=True)
class PoolEvent:
    seq: int
    kind: EventKind
    key: str  # "" for node events
    node_id: str
    tier: str  # "dram" or "ssd"; "" for node events
    time: float  # wall-clock seconds
    run_id: str  # the master run `seq` counts in


@dataclass(frozen=True)
class EventGap:
    """Instead of events: `lost` events from the requested sequence number on had left the
    ring before they could be sent."""

    run_id: str
    lost: int


class EventLog:
    """Thread-safe. `emit` is called by the master under its own lock; readers wait on ours."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert capacity > 0, "the ring holds at least one event"
        self.run_id = uuid.uuid4().hex[:16]
        self._ring: deque[PoolEvent] = deque(maxlen=capacity)
        self._last = 0
        self._wall = wall_clock
        self._cond = threading.Condition()
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self._last

    def emit(self, kind: EventKind, key: str = "", node_id: str = "",
             tier: str = DRAM) -> None:
        with self._cond:
            self._last += 1
            node_event = kind in (EventKind.NODE_JOINED, EventKind.NODE_LEFT)
            self._ring.append(PoolEvent(self._last, kind, key, node_id,
                                        "" if node_event else tier, self._wall(),
                                        self.run_id))
            self._cond.notify_all()

    def read(self, from_seq: int, limit: int = 1024) -> tuple[int, list[PoolEvent]]:
        """(gap, events): up to `limit` events from `from_seq` on, in order; gap is how many
        from `from_seq` on the ring no longer holds (0 when none were lost)."""
        with self._cond:
            first = self._last - len(self._ring) + 1  # the oldest seq the ring holds
            start = max(from_seq, first)
            gap = start - from_seq
            skip = start - first
            events = [self._ring[i] for i in range(skip, min(len(self._ring), skip + limit))]
            return gap, events

    def wait(self, from_seq: int, timeout: float) -> bool:
        """Until an event numbered `from_seq` or later exists (True), or `timeout` passes or
        the log is closed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._last >= from_seq or self._closed,
                                       timeout) and not self._closed

    def close(self) -> None:
        """Wake every waiting reader for good (the master is going away)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
