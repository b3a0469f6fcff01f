"""Puts vLLM's new blocks into the pool off the step: the step only copies the pages out.

A bounded backlog: when the pool is slower than prefill, the newest saves are dropped (a dropped
save is a later miss, never a wrong answer) rather than holding memory or the step.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

from connectors.pool_breaker import PoolBreaker
from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveBatch:
    keys: tuple[str, ...]
    pages: torch.Tensor  # (n, num_layers, page_elements), a copy owned by the saver

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()


class BackgroundSaver:
    def __init__(self, client: KVStoreClient, layout: BlockLayout, breaker: PoolBreaker,
                 max_pending_bytes: int) -> None:
        self._client = client
        self._layout = layout
        self._breaker = breaker
        self._max_pending = max_pending_bytes
        self._queue: queue.Queue[SaveBatch | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self.stored = 0
        self.dropped = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="pantry-kv-saver", daemon=True)
        self._thread.start()

    def submit(self, batch: SaveBatch) -> bool:
        """Queue a batch; False when it was dropped (backlog full or the pool is down)."""
        with self._lock:
            if not self._breaker.allows() or self._pending + batch.nbytes > self._max_pending:
                self.dropped += len(batch.keys)
                return False
            self._pending += batch.nbytes
            self._idle.clear()
        self._queue.put(batch)
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued batch was attempted; whether that happened in time."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            pages = batch.pages.view(len(batch.keys), -1).view(torch.uint8).numpy()
            try:
                ok = self._client.put_many(
                    [(k, memoryview(pages[i])) for i, k in enumerate(batch.keys)], self._layout)
                self._breaker.succeeded()
                self.stored += sum(ok)
                self.dropped += len(ok) - sum(ok)
            except Exception as e:  # any pool failure is a later miss, never the step's error
                self._breaker.failed("save", e)
                self.dropped += len(batch.keys)
            with self._lock:
                self._pending -= batch.nbytes
                if self._pending == 0 and self._queue.empty():
                    self._idle.set()
