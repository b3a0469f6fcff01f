"""Settings both engine roles (prefill, decode) share, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from pantry.common.errors import ConfigError

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineRoleConfig:
    model: str
    kv_master: str
    engine_id: str
    host: str = "127.0.0.1"
    port: int = 0
    block_size: int = 16
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_model_len: int = 0  # 0 = the model's own context length
    hash_seed: int = 0
    salt: str = ""
    threads: int = 0  # 0 = torch's default, or one per pinned CPU
    cpus: tuple[int, ...] = ()  # pin the engine to these CPUs; () = no pinning
    ready_file: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: name a model directory, a .gguf file or 'smollm2'")
        if not self.kv_master:
            raise ConfigError("kv_master: give the kvstore master address as HOST:PORT")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port (0 picks a free one)")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size: {self.block_size} must be a positive power of two")
        if self.kv_cache_bytes <= 0:
            raise ConfigError("kv_cache_bytes: must be positive")
        if self.max_model_len < 0:
            raise ConfigError("max_model_len: must be 0 (model default) or positive")
        if not 0 <= self.hash_seed < 2**64:
            raise ConfigError("hash_seed: must fit in 64 bits")
        if self.threads < 0:
            raise ConfigError("threads: must be 0 (default) or positive")
        if any(c < 0 for c in self.cpus) or len(set(self.cpus)) != len(self.cpus):
            raise ConfigError(f"cpus: {list(self.cpus)} must be distinct CPU numbers")
