"""Deciding when a sequence is finished and why."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pantry.common.sampling import SamplingParams

FinishReason = Literal["stop", "length"]


class StopChecker:
    def __init__(self, eos_token_ids: Iterable[int]) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def check(
        self, token_id: int, num_generated: int, params: SamplingParams
    ) -> FinishReason | None:
        """Finish reason after token_id was generated as the num_generated-th token, else None."""
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if num_generated >= params.max_tokens:
            return "length"
        return None
