"""Settings both engine roles (prefill, decode) share, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.config import TOKEN_FILE_HELP
from kvstore.hashing import DEFAULT_BLOCK_SIZE
from pantry.common.errors import ConfigError

DEFAULT_KV_CACHE_BYTES = 1 << 30
# --dtype: the model's weights, activations and KV cache.
DTYPES = ("float32", "bfloat16", "float16")
# --pool-kv-dtype (engine.pool_transfer.POOL_KV_DTYPES, repeated here to stay torch-free).
POOL_KV_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class EngineRoleConfig:
    model: str = field(metadata={"help": "HF model directory, .gguf file or 'smollm2'"})
    kv_master: str = field(metadata={"help": "kvstore master HOST:PORT"})
    engine_id: str = field(metadata={"help": "this engine's name in Load reports and metrics"})
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to serve gRPC and /metrics on"})
    port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free one"})
    block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={"help": "tokens per KV block, a power of two; engines sharing blocks agree"})
    kv_cache_bytes: int = field(
        default=DEFAULT_KV_CACHE_BYTES,
        metadata={"help": "paged KV cache size, e.g. 512MiB", "size": True})
    max_model_len: int = field(
        default=0, metadata={"help": "prompt + output limit in tokens; 0 = the model's context"})
    hash_seed: int = field(
        default=0, metadata={"help": "seed of the block-key hash; engines sharing blocks agree"})
    salt: str = field(
        default="",
        metadata={"help": "mixed into every block key: keeps deployments sharing a pool apart"})
    threads: int = field(
        default=0, metadata={"help": "torch threads; 0 = one per pinned CPU, or torch's default"})
    cpus: tuple[int, ...] = field(
        default=(), metadata={"help": "pin the engine to these CPUs, e.g. 0,1", "cpus": True})
    # Written by `pantry local` (engine.cpu_split): with it, --cpus is the engine's share while
    # an engine of the other role computes, and every CPU the process may use otherwise.
    cpu_board: str | None = field(
        default=None,
        metadata={"help": "shared CPU board of `pantry local`: compute on --cpus while an "
                          "engine of the other role computes, on every CPU otherwise"})
    cpu_board_slot: int = field(
        default=0, metadata={"help": "this engine's slot on --cpu-board"})
    ready_file: str | None = field(
        default=None,
        metadata={"help": "once serving, write the gRPC and metrics addresses here as JSON"})
    metrics_port: int = field(
        default=0, metadata={"help": "port of the Prometheus /metrics endpoint; 0 = any free"})
    token_file: str | None = field(default=None, metadata={"help": TOKEN_FILE_HELP})
    device: str = field(
        default="cpu", metadata={"help": "where the model and KV cache live: cpu, cuda or cuda:N"})
    dtype: str = field(
        default="float32",
        metadata={"help": f"model and KV cache dtype: {', '.join(DTYPES)}; engines sharing "
                          "blocks agree"})
    cuda_graphs: bool = field(
        default=True,
        metadata={"help": "decode engines on CUDA replay each step of up to 128 sequences as a "
                          "CUDA graph: one launch a step instead of one per kernel"})
    pool_kv_dtype: str = field(
        default="auto",
        metadata={"help": "KV blocks as stored in the pool: auto (the cache's dtype, exact) or "
                          "int8 (quantized per token and head, ~3.8x smaller from float32); "
                          "engines sharing blocks agree"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: name a model directory, a .gguf file or 'smollm2'")
        if not self.kv_master:
            raise ConfigError("kv_master: give the kvstore master address as HOST:PORT")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port (0 picks a free one)")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(
                f"metrics_port: {self.metrics_port} is not a TCP port (0 picks a free one)")
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
        if self.device != "cpu" and not (self.device == "cuda" or (
                self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"device: {self.device!r} must be cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.pool_kv_dtype not in POOL_KV_DTYPES:
            raise ConfigError(
                f"pool_kv_dtype: {self.pool_kv_dtype!r} must be one of {', '.join(POOL_KV_DTYPES)}")
        if any(c < 0 for c in self.cpus) or len(set(self.cpus)) != len(self.cpus):
            raise ConfigError(f"cpus: {list(self.cpus)} must be distinct CPU numbers")
        if self.cpu_board and not self.cpus:
            raise ConfigError("cpu_board: give the engine's own share of the CPUs with --cpus")
        if self.cpu_board_slot < 0:
            raise ConfigError(f"cpu_board_slot: {self.cpu_board_slot} must be 0 or positive")
