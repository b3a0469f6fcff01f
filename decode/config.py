"""The decode role's own settings: its limits, and its step trace (the settings it shares with
prefill are EngineRoleConfig).

Torch-free, so the command line can build its flags without loading a model runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class DecodeLimits:
    max_running: int = field(
        default=32, metadata={"help": "sequences decoded together in one batch"})
    max_waiting: int = field(
        default=256, metadata={"help": "queued requests before new ones are refused"})
    chunk_tokens: int = field(
        default=256,
        metadata={"help": "prompt tokens computed per step while other sequences decode"})
    # No running sequence has a time between tokens to protect: a prompt then takes one pass
    # (prefill's default chunk), not several of chunk_tokens.
    idle_chunk_tokens: int = field(
        default=2048,
        metadata={"help": "prompt tokens computed per step while no sequence is decoding "
                          "(at least --chunk-tokens)"})
    handoff_wait_s: float = field(
        default=0.5,
        metadata={"help": "how long a pull waits for blocks the prefill engine is still writing "
                          "(after the last one that appeared) before computing them instead"})

    step_trace: str | None = field(
        default=None,
        metadata={"help": "append one JSON line per decode step to this file: the loop's wall, "
                          "CPU and run-queue time, the batch, other threads' CPU "
                          "(engine/step_trace.py); for finding what made a token late"})

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "chunk_tokens", "idle_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.handoff_wait_s >= 0:
            raise ConfigError(f"handoff_wait_s: must be 0 or more, got {self.handoff_wait_s}")
