"""The conductor's settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.config import TOKEN_FILE_HELP
from pantry.common.errors import ConfigError

from .placement import POLICY_NAMES


@dataclass(frozen=True)
class ConductorConfig:
    """The conductor's settings. Its Prometheus metrics (its own request series and every
    role's state as last polled) are served at /metrics on the HTTP port: it has no
    metrics_port of its own."""

    model: str = field(metadata={
        "help": "where the tokenizer and chat template come from: an HF model directory, "
                "a .gguf file or 'smollm2'"})
    kv_master: str = field(metadata={"help": "the kvstore master, HOST:PORT"})
    prefill: tuple[str, ...] = field(metadata={
        "help": "a prefill engine, HOST:PORT; repeat for several", "repeat": True})
    decode: tuple[str, ...] = field(metadata={
        "help": "a decode engine, HOST:PORT; repeat for several", "repeat": True})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address the gRPC and HTTP servers listen on"})
    grpc_port: int = field(default=50051, metadata={
        "help": "port of the gRPC Generation API (0 = any free)"})
    http_port: int = field(default=8000, metadata={
        "help": "port of the OpenAI-compatible HTTP API, /health and the Prometheus "
                "/metrics (0 = any free)"})
    served_model_name: str = field(default="", metadata={
        "help": "model id clients use; none = the engines' model id"})
    default_max_tokens: int = field(default=256, metadata={
        "help": "max_tokens of requests that name none and whose API has no default of its "
                "own (chat), cut to what the context leaves"})
    max_request_bytes: int = field(default=8 * 1024 * 1024, metadata={
        "help": "largest HTTP request body accepted", "size": True})
    max_concurrent_requests: int = field(default=256, metadata={
        "help": "requests served at once; more are refused as overloaded (HTTP 429)"})
    ttft_slo_s: float = field(default=0.0, metadata={
        "help": "time-to-first-token SLO in seconds: refuse requests predicted to miss it "
                "(0 = admit everything)", "flag": "ttft_slo"})
    tbt_slo_s: float = field(default=0.0, metadata={
        "help": "time-between-tokens SLO in seconds: refuse requests whose decode engine is "
                "predicted to step slower than this with them in its batch (0 = admit "
                "everything)", "flag": "tbt_slo"})
    placement_policy: str = field(default="pantry", metadata={
        "help": "how engines are chosen: random, round_robin, load (shortest predicted "
                "queue), cache (longest prefix on the engine's host), pantry (lowest predicted "
                "TTFT: queue + compute of what is not cached + moving what is)"})
    # Dynamo's conditional disaggregation: a short prompt costs decode one longer step, less
    # than a hop through prefill and the pool; on shared CPUs it also skips the second
    # process streaming the weights (measured in bench/interference.py and side_by_side.sh).
    decode_prefill_tokens: int = field(default=0, metadata={
        "help": "prompts with at most this many tokens left to compute after the pool's "
                "prefix skip the prefill engine: their decode engine computes them in its own "
                "batch, in chunks between decode steps (0 = every miss goes through prefill)"})
    engine_timeout_s: float = field(default=600.0, metadata={
        "help": "deadline of one prefill or decode call to an engine, in seconds"})
    ready_file: str | None = field(default=None, metadata={
        "help": "write the addresses here as JSON once serving"})
    token_file: str | None = field(default=None, metadata={"help": TOKEN_FILE_HELP})

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
        if self.decode_prefill_tokens < 0:
            raise ConfigError("decode_prefill_tokens: must be 0 (off) or positive")
        for name in ("ttft_slo_s", "tbt_slo_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 (off) or positive")
        if self.placement_policy not in POLICY_NAMES:
            raise ConfigError(f"placement_policy: unknown {self.placement_policy!r}; use "
                              f"{', '.join(POLICY_NAMES)}")
