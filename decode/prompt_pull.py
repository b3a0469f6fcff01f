"""A decode sequence's prompt KV from the pool, on the engine's puller thread.

A sequence admitted with some of its prompt's blocks missing from this engine's cache pulls the
rest: straight into its own fresh blocks, never into blocks another sequence shares, so the
loop's steps go on meanwhile. What the pull cannot find is computed by the loop afterwards.

A request that carries a first token comes from a prefill engine (a handoff), which answers
before its last blocks are sealed in the pool: the pull waits for them (`handoff_wait_s` after
the last one that appeared) rather than recompute them. The prefill engine also stores the
prompt's partial last block under its tail key (kvstore.hashing), pulled into the block after
the full ones: with it, decode computes nothing of the prompt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.role_core import EngineCore

from .sequence import Sequence

log = logging.getLogger(__name__)

# How often a pull waiting for a prefill's last blocks asks the pool again: one master round
# trip on loopback is ~0.3 ms, and the wait is usually one chunk's put (tens of ms).
HANDOFF_POLL_S = 0.002


def is_handoff(seq: Sequence) -> bool:
    """A prefill engine computed the prompt, and the sequence has not started. (After a
    preemption its output has moved on; what is missing then is computed.)"""
    return seq.job.first_token is not None and not seq.output


def wants_tail(seq: Sequence) -> bool:
    """A handoff whose prompt's partial last block may be in the pool."""
    return seq.tail_key is not None and is_handoff(seq)


class PromptPull:
    """Called with a sequence on the puller thread (the loop's `_puller.submit`). `stopped`
    tells a pull waiting for a prefill's blocks that the engine is stopping."""

    def __init__(self, core: EngineCore, handoff_wait_s: float,
                 stopped: Callable[[], bool]) -> None:
        self.core = core
        self.handoff_wait_s = handoff_wait_s
        self._stopped = stopped

    def __call__(self, seq: Sequence) -> tuple[int, bool]:
        """Writes only this sequence's own fresh blocks. Returns the leading full blocks now in
        the cache, local ones included, and whether a handoff's whole prompt is (its tail
        block, if it has one, landed after them)."""
        transfer = self.core.transfer
        keys = seq.chain.keys[: len(seq.fill) // self.core.block_size]
        full = len(keys)
        if wants_tail(seq):
            assert seq.tail_key is not None
            keys = [*keys, seq.tail_key]  # into the block that follows the full ones
        loaded = seq.local_blocks
        loaded += transfer.load(keys[loaded:], seq.block_ids[loaded : len(keys)])
        handoff = is_handoff(seq)
        if loaded < len(keys) and handoff:
            loaded = self._await_handoff(seq, keys, loaded)
        return min(loaded, full), handoff and loaded == len(keys)

    def _await_handoff(self, seq: Sequence, keys: list[str], loaded: int) -> int:
        """A prefill engine computed this prompt and answered before its last blocks (and its
        tail, in the same put) were sealed: pulls them as they appear."""
        transfer = self.core.transfer
        started = last_seen = time.monotonic()
        try:
            while loaded < len(keys) and not seq.cancelled.is_set() and not self._stopped():
                if time.monotonic() - last_seen > self.handoff_wait_s:
                    log.warning("%s: %d prompt blocks never appeared in the pool; computing them",
                                seq.job.request_id, len(keys) - loaded)
                    break
                time.sleep(HANDOFF_POLL_S)
                try:
                    sealed = self.core.pool.match_prefix(keys[loaded:]).matched
                except Exception:  # the pool is down: computing is all that is left
                    log.warning("%s: pool unreachable while waiting for the prefill's blocks",
                                seq.job.request_id, exc_info=True)
                    break
                if sealed:
                    got = transfer.load(keys[loaded : loaded + sealed],
                                        seq.block_ids[loaded : loaded + sealed])
                    loaded += got
                    if got < sealed:  # sealed but refused by its checks: waiting cannot help
                        log.warning("%s: a prompt block in the pool failed its checks; "
                                    "computing from there", seq.job.request_id)
                        break
                    last_seen = time.monotonic()
        finally:
            self.core.metrics.handoff_wait_seconds.inc(time.monotonic() - started)
        return loaded
