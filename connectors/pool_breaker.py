"""Stop asking a pool that just failed, for a while: a pool that is down must cost requests
one failed call, not one per request (each would wait for its RPC to fail)."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class PoolBreaker:
    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._open_until = 0.0
        self.failures = 0

    def allows(self) -> bool:
        """Whether the pool may be asked now."""
        with self._lock:
            return time.monotonic() >= self._open_until

    def failed(self, what: str, error: BaseException) -> None:
        with self._lock:
            self.failures += 1
            first = self._open_until == 0.0 or time.monotonic() >= self._open_until
            self._open_until = time.monotonic() + self.retry_after_s
        if first:
            log.warning("pool %s failed (%s: %s); computing locally, asking again in %.1fs",
                        what, type(error).__name__, error, self.retry_after_s)

    def succeeded(self) -> None:
        with self._lock:
            self._open_until = 0.0
