"""How long an engine takes: prefill of a prompt, one decode step, moving a cached block.

Each model has a shape fixed at start (from the cost model of the hardware, or defaults for an
unknown engine) and one scale learned online from service times, never from latencies that
include queueing: the queue is predicted separately (`QueueLedger`), so it is not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EWMA_WEIGHT = 0.3


@dataclass
class _Fitted:
    """A model's learned scale: the first observation replaces the guess, later ones move it
    by an exponentially weighted average."""

    scale: float = 1.0
    observed: int = field(default=0)

    def _fit(self, seconds: float, base: float) -> None:
        if seconds <= 0 or base <= 0:
            return
        sample = seconds / base
        self.scale = sample if self.observed == 0 else (
            (1 - EWMA_WEIGHT) * self.scale + EWMA_WEIGHT * sample)
        self.observed += 1


@dataclass
class PrefillModel(_Fitted):
    """seconds = scale * (fixed + per_token * n + per_pair * n * (prefix + n / 2)) for n
    computed tokens after a cached prefix: linear layers plus causal attention."""

    fixed_s: float = 0.0
    per_token_s: float = 2e-3   # a CPU-class guess until the first observation
    per_pair_s: float = 0.0

    def base(self, computed: int, prefix: int) -> float:
        n = max(computed, 0)
        return self.fixed_s + self.per_token_s * n + self.per_pair_s * n * (prefix + n / 2)

    def predict(self, computed: int, prefix: int) -> float:
        return self.scale * self.base(computed, prefix)

    def observe(self, computed: int, prefix: int, seconds: float) -> None:
        """A measured service time (no queueing in it); the first replaces the guess."""
        if computed > 0:
            self._fit(seconds, self.base(computed, prefix))


@dataclass
class DecodeModel(_Fitted):
    """One decode step: seconds = scale * max(fixed + per_seq * batch + per_kv_token * context,
    0): weights read once per step, every sequence's KV read once."""

    fixed_s: float = 0.02
    per_seq_s: float = 1e-3
    per_kv_token_s: float = 0.0

    def base(self, batch: int, context_tokens: int) -> float:
        return self.fixed_s + self.per_seq_s * batch + self.per_kv_token_s * context_tokens

    def predict(self, batch: int, context_tokens: int) -> float:
        return self.scale * self.base(batch, context_tokens)

    def observe(self, batch: int, context_tokens: int, seconds: float) -> None:
        self._fit(seconds, self.base(batch, context_tokens))


@dataclass
class TransferModel:
    """Seconds to bring one cached block into an engine, by where it lives: `local` (the
    engine's own cache or its host's pool segment) or a pool tier such as `remote`."""

    seconds_per_block: dict[str, float] = field(
        default_factory=lambda: {"local": 0.0, "pool": 2e-4, "remote": 2e-4})

    def seconds(self, tier: str) -> float:
        return self.seconds_per_block.get(tier, self.seconds_per_block.get("pool", 0.0))

    def observe(self, tier: str, blocks: int, seconds: float) -> None:
        if blocks <= 0 or seconds <= 0:
            return
        sample = seconds / blocks
        old = self.seconds_per_block.get(tier)
        self.seconds_per_block[tier] = sample if old is None else (
            (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample)


@dataclass
class QueueLedger:
    """An engine's predicted queue, from the work this conductor sent it (FIFO service).

    `busy_until` is when the engine should be done with everything sent so far. A finished
    request's service time is measured from when the previous one finished (or from its own
    dispatch when the engine was idle), which is what a FIFO engine spent on it alone."""

    busy_until: float = 0.0
    outstanding: int = 0
    free_since: float = 0.0   # when the engine last finished or was last seen idle

    def queue_s(self, now: float) -> float:
        return max(self.busy_until - now, 0.0)

    def dispatch(self, now: float, service_s: float) -> float:
        """Returns when the request should start."""
        start = max(now, self.busy_until)
        if self.outstanding == 0:
            self.free_since = now
        self.busy_until = start + service_s
        self.outstanding += 1
        return start

    def complete(self, now: float) -> float:
        """Returns the measured service time of the request that just finished."""
        assert self.outstanding > 0
        service = now - self.free_since
        self.free_since = now
        self.outstanding -= 1
        if self.outstanding == 0:
            self.busy_until = now
        return service
