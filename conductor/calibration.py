"""A cost model measured on running engines instead of computed from a GPU's data sheet.

`pantry replay --simulate --calibrate-from URL` (and `bench/replay_live_vs_sim.py`) probe a
running Pantry with cold prompts of a few lengths, one at a time, so each time to first token is
a service time with no queue in it; a repeat of the longest prompt, whose full blocks are then in
the pool, prices reading a cached block. This module turns those measurements into the models
the simulator and the placement code use. Pure code: the probing lives with the HTTP client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pantry.common.errors import ConfigError

from .perf_model import DecodeModel, PrefillModel, TransferModel


@dataclass(frozen=True)
class ColdPrefill:
    """A prompt nothing of which was cached, served alone."""

    prompt_tokens: int
    ttft_s: float
    tbt_s: float          # mean gap between its streamed tokens (0: one token only)


@dataclass(frozen=True)
class CachedRepeat:
    """A prompt served again: its `cached_blocks` full blocks were read from the pool."""

    prompt_tokens: int
    cached_blocks: int
    block_tokens: int
    ttft_s: float


@dataclass(frozen=True)
class Calibration:
    """Fitted costs; `prefill_model`, `decode_model` and `transfer_model` answer as
    `ClusterSpec`'s do, so the simulator takes either."""

    prefill_fixed_s: float
    prefill_per_token_s: float
    decode_step_s: float
    transfer_per_block_s: float

    def prefill_model(self) -> PrefillModel:
        return PrefillModel(fixed_s=self.prefill_fixed_s, per_token_s=self.prefill_per_token_s)

    def decode_model(self) -> DecodeModel:
        return DecodeModel(fixed_s=self.decode_step_s, per_seq_s=0.0)

    def transfer_model(self) -> TransferModel:
        per_block = self.transfer_per_block_s
        return TransferModel({"local": per_block, "pool": per_block, "remote": per_block})


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x, both clamped at 0: a cost is never
    negative, and noise on a near-flat line must not make the intercept so."""
    n = len(points)
    xs = {x for x, _ in points}
    if len(xs) < 2:
        raise ConfigError("calibration: measure at least two different prompt lengths")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = (sum((x - mx) * (y - my) for x, y in points)
             / sum((x - mx) ** 2 for x, _ in points))
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def calibrate(cold: Sequence[ColdPrefill], repeats: Sequence[CachedRepeat]) -> Calibration:
    """Prefill: a line through the cold TTFTs over prompt length. Decode: the mean streamed
    gap. Transfer: what a repeat took beyond computing its uncached tail, per cached block."""
    fixed, per_token = fit_line([(c.prompt_tokens, c.ttft_s) for c in cold])
    gaps = [c.tbt_s for c in cold if c.tbt_s > 0]
    step = sum(gaps) / len(gaps) if gaps else 0.0
    per_block = []
    for r in repeats:
        if r.cached_blocks <= 0:
            continue
        tail = max(r.prompt_tokens - r.cached_blocks * r.block_tokens, 1)
        per_block.append(max(r.ttft_s - (fixed + per_token * tail), 0.0) / r.cached_blocks)
    transfer = sum(per_block) / len(per_block) if per_block else 0.0
    return Calibration(fixed, per_token, step, transfer)
