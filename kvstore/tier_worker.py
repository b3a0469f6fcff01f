"""A storage node's tiering worker: executes the master's spill, promote and drop orders.

Off every request path: orders arrive in heartbeat answers, one background thread copies bytes
between the DRAM segment and the SSD tier, and what it did goes back in the next heartbeat. It
never trusts a slot: a spill copies the slot out first and the SSD tier checks that copy (key,
lengths, checksum) before it is stored, since the slot may have been evicted and reused since
the master sent the order; a promotion is read straight into the pending slot the master
allocated for it and checked there before it is reported done.
"""

from __future__ import annotations

import logging
import queue
import threading

from kvstore.segment import Segment
from kvstore.ssd_tier import Spill, SsdTier
from kvstore.tiering import TierDone, TierOp, TierOrder

log = logging.getLogger(__name__)


class TierWorker:
    def __init__(self, segment: Segment, ssd: SsdTier) -> None:
        self._segment = segment
        self._ssd = ssd
        self._orders: queue.SimpleQueue[tuple[int, TierOrder] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[TierDone] = []
        # Orders are for one registration's slots: those of an older epoch are skipped.
        self._epoch = 0
        self._thread = threading.Thread(target=self._run, name="kv-node-tiering", daemon=True)
        self._thread.start()

    def submit(self, epoch: int, orders: list[TierOrder]) -> None:
        for order in orders:
            self._orders.put((epoch, order))

    def new_epoch(self, epoch: int) -> None:
        """The node registered again: queued orders and unreported results are void (the
        registration reported everything the SSD tier holds)."""
        with self._lock:
            self._epoch = epoch
            self._done.clear()

    def take_report(self) -> tuple[list[TierDone], list[str]]:
        """What was done and which SSD files went away since the last call; the caller hands
        them back with `give_back` if the master did not get them."""
        with self._lock:
            done, self._done = self._done, []
        return done, self._ssd.drain_dropped()

    def give_back(self, done: list[TierDone], dropped: list[str]) -> None:
        with self._lock:
            self._done[:0] = done
        self._ssd.restore_dropped(dropped)

    def _run(self) -> None:
        while True:
            item = self._orders.get()
            if item is None:
                return
            epoch, order = item
            if epoch != self._epoch:
                continue
            try:
                result = self._execute(order)
            except Exception:  # a worker that dies would stall tiering silently
                log.exception("tier order %s failed", order)
                result = TierDone(order.op, order.key, order.token, False, order.length)
            if result is not None:
                with self._lock:
                    if epoch == self._epoch:
                        self._done.append(result)

    def _execute(self, order: TierOrder) -> TierDone | None:
        end = order.offset + order.length
        if order.op is TierOp.DROP:
            self._ssd.remove(order.key)
            return None
        if end > self._segment.size:
            log.warning("tier order %s is outside the segment", order)
            return TierDone(order.op, order.key, order.token, False, order.length)
        if order.op is TierOp.SPILL:
            # A private copy: the slot may be reused while the file is written.
            data = self._segment.read(order.offset, order.length)
            outcome = self._ssd.spill(order.key, data)
            if outcome not in (Spill.STORED, Spill.EXISTS):
                log.info("spill of %s refused: %s", order.key, outcome.value)
            ok = outcome in (Spill.STORED, Spill.EXISTS)
            return TierDone(order.op, order.key, order.token, ok, order.length)
        assert order.op is TierOp.PROMOTE, order
        got = self._ssd.read_into(order.key, self._segment.view[order.offset : end])
        ok = got is not None and got.nbytes == order.length
        return TierDone(order.op, order.key, order.token, ok, order.length)

    def close(self) -> None:
        self._orders.put(None)
        self._thread.join(timeout=5)
