"""The prefill role's own limits (the settings it shares with decode are EngineRoleConfig).

Torch-free, so the command line can build its flags without loading a model runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class PrefillLimits:
    # A prefill engine has no decode steps to protect, so a pass may be long: 2048 computes a
    # 2048-token prompt in one causal pass. SmolLM2, 2048 tokens, 2 threads: the main thread
    # (the one the wall time follows) spent 3.3-3.5 s of CPU against 3.6-3.7 s at 512, its
    # worker thread as much as it (0.2-0.3 s less at 512); at 1 thread both within 1%.
    chunk_tokens: int = field(
        default=2048, metadata={"help": "prompt tokens computed per forward pass"})
    step_trace: str | None = field(
        default=None,
        metadata={"help": "append one JSON line per forward pass to this file: the loop's "
                          "wall, CPU and run-queue time, the batch, the blocks stored, other "
                          "threads' CPU (engine/step_trace.py)"})

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens: must be at least 1, got {self.chunk_tokens}")
