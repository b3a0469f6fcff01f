"""The prefill role's own limits (the settings it shares with decode are EngineRoleConfig).

Torch-free, so the command line can build its flags without loading a model runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class PrefillLimits:
    chunk_tokens: int = field(
        default=512, metadata={"help": "prompt tokens computed per forward pass"})

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens: must be at least 1, got {self.chunk_tokens}")
