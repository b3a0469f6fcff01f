"""KV-centric placement: the prefill engine with the lowest predicted TTFT, the decode engine with
the most headroom, and early rejection when the prediction already misses the SLO."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pantry.common.engine_info import EngineDescription, EngineLoad

C = TypeVar("C")

# Before any prefill has been observed: a CPU-class guess, replaced by measurements.
INITIAL_SECONDS_PER_TOKEN = 2e-3
# Pulling one cached block costs far less than computing it; refined later per transport.
SECONDS_PER_CACHED_BLOCK = 2e-4
EWMA_WEIGHT = 0.3


@dataclass
class EngineState(Generic[C]):
    client: C
    info: EngineDescription
    load: EngineLoad | None = None
    up: bool = True
    inflight_tokens: int = 0            # prompt tokens this conductor has sent and not seen back
    inflight_requests: int = 0
    seconds_per_token: float = INITIAL_SECONDS_PER_TOKEN
    observed: int = field(default=0)


@dataclass(frozen=True)
class Placement(Generic[C]):
    engine: EngineState[C]
    predicted_ttft_s: float


class Scheduler(Generic[C]):
    def __init__(self, ttft_slo_s: float = 0.0) -> None:
        self.ttft_slo_s = ttft_slo_s

    def predict_ttft(self, st: EngineState[C], uncached: int, cached_blocks: int) -> float:
        queue = st.inflight_tokens * st.seconds_per_token
        return queue + uncached * st.seconds_per_token + cached_blocks * SECONDS_PER_CACHED_BLOCK

    def choose_prefill(
        self, engines: list[EngineState[C]], uncached: int, cached_blocks: int
    ) -> Placement[C] | None:
        """None when no engine is up."""
        best: Placement[C] | None = None
        for st in engines:
            if not st.up:
                continue
            ttft = self.predict_ttft(st, uncached, cached_blocks)
            if best is None or ttft < best.predicted_ttft_s:
                best = Placement(st, ttft)
        return best

    def choose_decode(
        self, engines: list[EngineState[C]], tokens_reserved: int
    ) -> EngineState[C] | None:
        best: EngineState[C] | None = None
        best_key: tuple[int, float] | None = None
        for st in engines:
            if not st.up:
                continue
            load = st.load
            need = math.ceil(tokens_reserved / max(st.info.block_size, 1))
            fits = load is None or load.free_blocks >= need
            busy = st.inflight_requests + (load.waiting if load else 0)
            key = (0 if fits else 1, float(busy))
            if best_key is None or key < best_key:
                best, best_key = st, key
        return best

    def misses_slo(self, placement: Placement[C]) -> bool:
        return self.ttft_slo_s > 0 and placement.predicted_ttft_s > self.ttft_slo_s

    @staticmethod
    def observe_prefill(st: EngineState[C], computed_tokens: int, seconds: float) -> None:
        if computed_tokens <= 0 or seconds <= 0:
            return
        sample = seconds / computed_tokens
        st.seconds_per_token = (
            sample if st.observed == 0
            else (1 - EWMA_WEIGHT) * st.seconds_per_token + EWMA_WEIGHT * sample
        )
        st.observed += 1
