"""Puts vLLM's new blocks into the pool off the step: the step only copies the pages out.

A bounded backlog: when the pool is slower than prefill, the newest saves are dropped (a dropped
save is a later miss, never a wrong answer) rather than holding memory or the step. The pages
are copied into buffers the saver keeps and reuses once their put is done: a fresh buffer costs
its page faults inside the step (a 2048-token prompt's 94 MB took 0.2 to 0.9 s to gather into
new memory on a busy machine, against tens of ms into touched memory).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from connectors.pool_breaker import PoolBreaker
from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient

log = logging.getLogger(__name__)

# Bytes of finished buffers kept for reuse; past this they are freed.
KEEP_BYTES = 128 << 20


@dataclass(frozen=True)
class SaveBatch:
    keys: tuple[str, ...]
    pages: np.ndarray  # (n, num_layers, page bytes): the first n rows of `buffer`
    buffer: np.ndarray  # owned by the saver until the put is done

    @property
    def nbytes(self) -> int:
        return int(self.pages.nbytes)


class BackgroundSaver:
    def __init__(self, client: KVStoreClient, layout: BlockLayout, breaker: PoolBreaker,
                 max_pending_bytes: int, new_pages: Callable[[int], np.ndarray]) -> None:
        """`new_pages(n)`: a buffer for n blocks (`PagedKV.new_pages`)."""
        self._client = client
        self._layout = layout
        self._breaker = breaker
        self._max_pending = max_pending_bytes
        self._new_pages = new_pages
        self._queue: queue.Queue[SaveBatch | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._free: list[np.ndarray] = []
        self.stored = 0
        self.dropped = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="pantry-kv-saver", daemon=True)
        self._thread.start()

    def submit(self, keys: tuple[str, ...], fill: Callable[[np.ndarray], object],
               block_nbytes: int) -> bool:
        """Queue the blocks of `keys`, their pages copied by `fill(out)` into a buffer of the
        saver's; False when they were dropped (backlog full or the pool is down)."""
        nbytes = len(keys) * block_nbytes
        with self._lock:
            if not self._breaker.allows() or self._pending + nbytes > self._max_pending:
                self.dropped += len(keys)
                return False
            self._pending += nbytes
            self._idle.clear()
            fitting = [i for i, b in enumerate(self._free) if len(b) >= len(keys)]
            # By index: list.remove would compare arrays element-wise.
            buffer = (self._free.pop(min(fitting, key=lambda i: len(self._free[i])))
                      if fitting else None)
        if buffer is None:  # a power of two of blocks, so later saves of other sizes fit it
            buffer = self._new_pages(1 << (len(keys) - 1).bit_length())
        pages = buffer[: len(keys)]
        fill(pages)
        self._queue.put(SaveBatch(keys, pages, buffer))
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued batch was attempted; whether that happened in time."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                ok = self._client.put_many(
                    [(k, memoryview(batch.pages[i]).cast("B"))
                     for i, k in enumerate(batch.keys)], self._layout)
                self._breaker.succeeded()
                self.stored += sum(ok)
                self.dropped += len(ok) - sum(ok)
            except Exception as e:  # any pool failure is a later miss, never the step's error
                self._breaker.failed("save", e)
                self.dropped += len(batch.keys)
            with self._lock:
                self._pending -= batch.nbytes
                if sum(b.nbytes for b in self._free) + batch.buffer.nbytes <= KEEP_BYTES:
                    self._free.append(batch.buffer)
                if self._pending == 0 and self._queue.empty():
                    self._idle.set()
