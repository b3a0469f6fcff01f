"""Sampling settings as the engines receive them: validated once, on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pantry.common.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise InvalidRequest("temperature", f"must be >= 0, got {t!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < 2**31:
            raise InvalidRequest("max_tokens", f"must be at least 1, got {self.max_tokens!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise InvalidRequest("seed", f"must be between 0 and 2**64 - 1, got {self.seed!r}")
        if not all(isinstance(t, int) and 0 <= t < 2**32 for t in self.stop_token_ids):
            raise InvalidRequest(
                "stop_token_ids", f"must be non-negative integers, got {list(self.stop_token_ids)}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
