"""What an engine says about itself (Info) and its current load (Load)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineDescription:
    role: str
    engine_id: str
    model_id: str
    fingerprint: str
    block_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    hash_seed: int
    salt: str = ""      # mixed into the engine's block keys: the conductor must name them alike
    host_id: str = ""   # the machine it runs on: which pool blocks it reads at the local tier


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    free_blocks: int
    total_blocks: int
    requests_total: int
    computed_tokens_total: int
    pool_tokens_total: int
    busy_seconds_total: float
