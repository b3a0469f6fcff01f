"""The conductor's settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class ConductorConfig:
    model: str                              # where the tokenizer and chat template come from
    kv_master: str
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 8000
    served_model_name: str = ""             # "" = the engines' model id
    default_max_tokens: int = 256           # chat requests that name no limit
    max_request_bytes: int = 8 * 1024 * 1024
    max_concurrent_requests: int = 256
    ttft_slo_s: float = 0.0                 # 0 = admit everything; else reject predicted misses
    engine_timeout_s: float = 600.0
    ready_file: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: name the model (for its tokenizer)")
        if not self.kv_master:
            raise ConfigError("kv_master: give the kvstore master as HOST:PORT")
        if not self.prefill:
            raise ConfigError("prefill: give at least one prefill engine address")
        if not self.decode:
            raise ConfigError("decode: give at least one decode engine address")
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"{name}: {port} is not a TCP port (0 = any free)")
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens: must be at least 1")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes: must be at least 1024")
        if self.max_concurrent_requests < 1:
            raise ConfigError("max_concurrent_requests: must be at least 1")
        if self.ttft_slo_s < 0:
            raise ConfigError("ttft_slo_s: must be 0 (off) or positive")
