"""What the prefill and decode engines share: a loop that sleeps on one condition, a puller
beside it, and stopping.

The loop runs on a thread of its own (`background=True`, in-process use) or on the server's main
thread (`run()`), where torch's OpenMP pool serves it best. Pulls from the pool run on a single
worker beside the loop, single-threaded: a second OpenMP team spinning beside the loop's slows
every later step by ~1.7x on a small machine.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.role_core import EngineCore


class EngineLoop(ABC):
    def __init__(self, core: EngineCore, role: str) -> None:
        self.core = core
        self._role = role
        self._cv = threading.Condition()
        self._stopped = False
        self._puller = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{role}-pull",
            initializer=lambda: torch.set_num_threads(1),
        )
        self._thread: threading.Thread | None = None

    def _begin(self, background: bool) -> None:
        """Called last by a subclass's __init__, once its own state exists."""
        self.core.metrics.watch_load(self.load)
        if background:
            self._thread = threading.Thread(target=self.run, name=f"{self._role}-loop",
                                            daemon=True)
            self._thread.start()

    def _computing(self, computing: bool) -> None:
        """Where the loop may change CPUs (engine.cpu_split): before it computes, and before
        it waits with nothing to do."""
        if self.core.cpus is not None:
            self.core.cpus.poll(computing)

    @abstractmethod
    def load(self) -> tuple[int, int]:
        """(waiting, running) for the engine's Load RPC and metrics."""

    @abstractmethod
    def run(self) -> None:
        """The engine loop; returns once stop is requested."""

    def request_stop(self) -> None:
        """Safe from a signal handler on the thread running the loop (the lock is reentrant)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._puller.shutdown(wait=True)
        self.core.flush_writes()
