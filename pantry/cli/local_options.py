"""`pantry local`'s options: one typed config, validated on construction, from which the
command line's flags are built (torch-free, like every role's config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from conductor.config import ConductorConfig
from decode.config import DecodeLimits
from engine.model_files import DEFAULT_MODEL_SPEC
from engine.role_config import EngineRoleConfig
from pantry.common.config_flags import default_of, field_like
from pantry.common.errors import ConfigError

PREFILL_NICE = 10
CPU_SPLITS = ("adaptive", "shared", "pin")


@dataclass(frozen=True)
class LocalOptions:
    model: str = field(default=DEFAULT_MODEL_SPEC, metadata={
        "help": "HF model directory, .gguf file or 'smollm2'"})
    host: str = field(default=default_of(ConductorConfig, "host"), metadata={
        "help": "address every role listens on"})
    http_port: int = field(default=default_of(ConductorConfig, "http_port"), metadata={
        "help": "the conductor's OpenAI HTTP API, /health and /metrics (0 = any free)"})
    grpc_port: int = field(default=default_of(ConductorConfig, "grpc_port"), metadata={
        "help": "the conductor's gRPC Generation API (0 = any free)"})
    block_size: int = field(default=default_of(EngineRoleConfig, "block_size"), metadata={
        "help": "tokens per KV block"})
    # One machine holds the pool and both engines: smaller than each role's own default.
    pool_bytes: int = field(default=1 << 30, metadata={
        "help": "DRAM of the storage node", "size": True})
    kv_cache_bytes: int = field(default=512 << 20, metadata={
        "help": "paged KV cache of each engine", "size": True})
    max_model_len: int = field(default=default_of(EngineRoleConfig, "max_model_len"), metadata={
        "help": "prompt + output limit in tokens; 0 = the model's context"})
    served_model_name: str = field(default=default_of(ConductorConfig, "served_model_name"),
                                   metadata={"help": "model id clients use"})
    max_concurrent_requests: int = field(
        default=default_of(ConductorConfig, "max_concurrent_requests"),
        metadata={"help": "requests served at once; more get HTTP 429"})
    threads: int = field(default=default_of(EngineRoleConfig, "threads"), metadata={
        "help": "torch threads per engine; 0 = one per CPU it may use"})
    # Passed to every engine: prefill and decode share blocks, so they must agree.
    device: str = field_like(EngineRoleConfig, "device")
    dtype: str = field_like(EngineRoleConfig, "dtype")
    pool_kv_dtype: str = field_like(EngineRoleConfig, "pool_kv_dtype")
    cuda_graphs: bool = field_like(EngineRoleConfig, "cuda_graphs")
    prefill_engines: int = field(default=1, metadata={"help": "prefill engines to start"})
    decode_engines: int = field(default=1, metadata={"help": "decode engines to start"})
    # Measured in bench/cpu_split.py and bench/interference.py (engine/cpu_split.py says
    # what): one core each is better for both roles while both compute, every core is better
    # for a role computing alone.
    cpu_split: str = field(default="adaptive", metadata={
        "help": "how prefill and decode share the CPUs: adaptive (each engine on its own half "
                "while an engine of the other role computes, on every CPU otherwise), shared "
                "(every engine on every CPU, always) or pin (each role on its own half, always). "
                "Unpinned engines' waiting OpenMP threads sleep rather than spin"})
    # Not under adaptive: there prefill shares decode's compute cores only until its next
    # layer, but it always shares its own half with decode's pulls and servers (and at times
    # the pool's processes), which nice 10 would put ahead of it. Measured, the prompts' TTFT
    # p50 was the same at nice 10 and 0 (43.7 and 43.2 s, against pin's 37.2 and 34.7 s in the
    # same runs).
    prefill_nice: int = field(default=PREFILL_NICE, metadata={
        "help": "with --cpu-split shared, how much lower prefill's scheduling priority is than "
                "decode's (nice)"})
    # SCHED_IDLE (CFS weight 3, against nice 10's 110), measured in bench/interference.py and
    # bench/cpu_split.py on 2 cores: decode's p99/p50 TBT no better (2.40 vs 2.30 at low load),
    # prompts arriving under decode load waited longer for their first token (17.8 vs 13.4 s),
    # and with other processes running a cold prefill took 1.3x to 2.9x as long: an idle-class
    # prefill yields to every process on the machine, not only to decode. Under adaptive it
    # cut decode's loop waits for its moved threads (GIL and CPU) from 5% of its time to 1.7%,
    # but not p99/p50 (1.57, 1.65 against 1.58, 1.58), and TTFT p50 rose (docs/ARCHITECTURE.md).
    prefill_idle: bool = field(default=False, metadata={
        "help": "with --cpu-split shared, run prefill under SCHED_IDLE: it computes only on "
                "cycles that decode and every other process leave free"})
    # Measured: one decode thread does not make steps steadier while prompts arrive (p99/p50
    # 5.0 against 3.5 with two), and halves the tok/s of a decode alone.
    decode_threads: int = field(default=0, metadata={
        "help": "torch threads of each decode engine; 0 = as --threads"})
    # A decode step is ~150 OpenMP regions of well under a millisecond; a sleeping thread takes
    # long to wake for each. Measured on 2 cores, one decode step alone (8 streams): spinning
    # 44-50 ms, sleeping 69 ms, the same as one thread. Through `pantry local` on a quiet
    # machine, spinning 10000 gave 1 stream 22-23 -> 25-27 tok/s, 8 streams 148-157 -> 161-177
    # and `vllm bench serve` +10-20%; but with prefill computing beside decode p99/p50 TBT went
    # 1.46 -> 3.36 (bench/interference.py), and with other processes running `vllm bench serve`
    # fell 2.5x (spin 10000) and 10-25% (1000): it stays off by default.
    decode_spin: int = field(default=0, metadata={
        "help": "busy-wait loops of decode's waiting OpenMP threads before they sleep "
                "(GOMP_SPINCOUNT; 10000 is ~0.25 ms here); 0 = sleep at once"})
    decode_chunk_tokens: int = field(default=default_of(DecodeLimits, "chunk_tokens"), metadata={
        "help": "prompt tokens decode computes per step itself (when no prefill engine "
                "answers)"})
    decode_step_trace: str | None = field(default=None, metadata={
        "help": "the decode engine's step trace file (pantry decode --step-trace; with several "
                "decode engines, each appends its own lines)"})
    prefill_step_trace: str | None = field(default=None, metadata={
        "help": "the prefill engine's pass trace file (pantry prefill --step-trace); may be "
                "decode's file: each line names its engine"})
    # One machine's CPUs: a short prompt through prefill puts a second process streaming the
    # weights beside decode's steps, and a pool hop before decode starts. Measured with `vllm
    # bench serve` (256-token prompts, concurrency 4), cold output tok/s 18.8-19.0 -> 23.6-28.2
    # and TTFT 3.5-3.6 s -> 1.5-1.8 s. Longer prompts still go to prefill, whose chunks are 8x
    # decode's. The conductor's own default (0) is for engines on machines of their own.
    decode_prefill_tokens: int = field(default=512, metadata={
            "help": "prompts with at most this many tokens to compute skip prefill: decode "
                    "computes them in its own batch (0 = every miss goes through prefill)"})
    ready_file: str | None = field(default=None, metadata={
        "help": "write the addresses here as JSON when serving"})
    log_dir: str | None = field(default=None, metadata={
        "help": "one log file per role instead of this terminal"})

    def __post_init__(self) -> None:
        if self.cpu_split not in CPU_SPLITS:
            raise ConfigError(f"cpu_split: {self.cpu_split!r} must be one of "
                              f"{', '.join(CPU_SPLITS)}")
        for name in ("prefill_engines", "decode_engines"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.decode_spin < 0:
            raise ConfigError("decode_spin: must be 0 (sleep at once) or positive")
        if self.decode_threads < 0:
            raise ConfigError("decode_threads: must be 0 (as --threads) or positive")
        if not 0 <= self.prefill_nice <= 19:
            raise ConfigError(f"prefill_nice: {self.prefill_nice} is not a nice increment "
                              "from 0 to 19")
        # The engines' own checks, here, before any process starts.
        EngineRoleConfig(model=self.model, kv_master="localhost:1", engine_id="check",
                         device=self.device, dtype=self.dtype, pool_kv_dtype=self.pool_kv_dtype)
