"""A GPU cluster on paper: how long prefill, a decode step and moving a KV block take, from the
model's shape and each engine's FLOP/s and bandwidths. Defaults are the paper's hardware:
a LLaMA-70B-class model on engines of 8 A800s.

The paper's load (Mooncake FAST'25, Fig. 5: random placement averages 19.65 s TTFT, load
balancing 5.27 s) is a cluster where queueing dominates; 8 engines at the trace's own rate are
far lighter (random 2.7 s). `--prefill-engines 4 --decode-engines 4 --time-scale 0.85` (arrivals
1.18x faster, as Mooncake time-scales its traces) reproduces both baselines: random 20.1 s, load
5.6 s."""

from __future__ import annotations

from dataclasses import dataclass, field

from pantry.common.errors import ConfigError

from .perf_model import DecodeModel, PrefillModel, TransferModel

GB = 1e9


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster `pantry replay --simulate` runs the trace against."""

    params_b: float = field(default=70.0, metadata={
        "help": "model parameters, in billions (LLaMA-70B: 70)"})
    layers: int = field(default=80, metadata={"help": "transformer layers"})
    hidden: int = field(default=8192, metadata={"help": "hidden size (attention width)"})
    kv_bytes_per_token: int = field(default=320 * 1024, metadata={
        "help": "KV cache bytes per token, all layers (LLaMA-70B, bf16, GQA 8x128: 320KiB)",
        "size": True})
    gpus_per_engine: int = field(default=8, metadata={"help": "GPUs in one engine (TP)"})
    gpu_tflops: float = field(default=250.0, metadata={
        "help": "achieved dense bf16 TFLOP/s per GPU (A800: 312 rated, ~250 achieved; "
                "H100 SXM: 989 rated, ~800 achieved)"})
    gpu_hbm_gbps: float = field(default=2000.0, metadata={
        "help": "HBM bandwidth per GPU, GB/s (A800: 2000, H100 SXM: 3350)"})
    gpu_hbm_gib: float = field(default=80.0, metadata={"help": "HBM per GPU, GiB"})
    local_gbps: float = field(default=200.0, metadata={
        "help": "pool tier 'local': host DRAM to the engine's GPUs, GB/s per engine"})
    remote_gbps: float = field(default=100.0, metadata={
        "help": "pool tier 'remote': another node's DRAM over the network, GB/s per engine"})
    pool_blocks: int = field(default=100_000, metadata={
        "help": "pool capacity in blocks, all nodes together (split evenly over the "
                "prefill engines' hosts)"})
    block_tokens: int = field(default=512, metadata={"help": "tokens per pool block"})
    prefill_engines: int = field(default=8, metadata={"help": "prefill engines"})
    decode_engines: int = field(default=8, metadata={"help": "decode engines"})
    ttft_slo_s: float = field(default=30.0, metadata={
        "help": "TTFT SLO, seconds (attainment; early rejection with --early-reject)",
        "flag": "ttft_slo"})
    tbt_slo_s: float = field(default=0.1, metadata={
        "help": "time-between-tokens SLO, seconds", "flag": "tbt_slo"})

    def __post_init__(self) -> None:
        for name in ("params_b", "gpu_tflops", "gpu_hbm_gbps", "gpu_hbm_gib", "local_gbps",
                     "remote_gbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for name in ("layers", "hidden", "kv_bytes_per_token", "gpus_per_engine",
                     "pool_blocks", "block_tokens", "prefill_engines", "decode_engines"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.ttft_slo_s < 0 or self.tbt_slo_s < 0:
            raise ConfigError("ttft_slo_s, tbt_slo_s: must be 0 (none) or positive")
        if self.kv_capacity_tokens < 1:
            raise ConfigError("gpu_hbm_gib: the weights leave no room for KV on a decode engine")

    @property
    def flops(self) -> float:
        return self.gpu_tflops * 1e12 * self.gpus_per_engine

    @property
    def hbm_bps(self) -> float:
        return self.gpu_hbm_gbps * GB * self.gpus_per_engine

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * 2  # bf16

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.kv_bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        """KV a decode engine holds beside its weights."""
        hbm = self.gpu_hbm_gib * 2**30 * self.gpus_per_engine
        return int((hbm - self.weight_bytes) // self.kv_bytes_per_token)

    def prefill_model(self) -> PrefillModel:
        """2 FLOPs per parameter per token, plus causal attention: 4 * layers * hidden FLOPs per
        (query, key) pair; compute-bound at these lengths."""
        return PrefillModel(fixed_s=self.weight_bytes / self.hbm_bps,
                            per_token_s=2 * self.params_b * 1e9 / self.flops,
                            per_pair_s=4 * self.layers * self.hidden / self.flops)

    def decode_model(self) -> DecodeModel:
        """Memory-bound: every step reads the weights and every sequence's KV once, plus the
        batch's matmul FLOPs."""
        return DecodeModel(fixed_s=self.weight_bytes / self.hbm_bps,
                           per_seq_s=2 * self.params_b * 1e9 / self.flops,
                           per_kv_token_s=self.kv_bytes_per_token / self.hbm_bps)

    def transfer_model(self) -> TransferModel:
        return TransferModel({"local": self.block_bytes / (self.local_gbps * GB),
                              "remote": self.block_bytes / (self.remote_gbps * GB)})
