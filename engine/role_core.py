"""The parts of a serving engine that prefill and decode share: model, cache, pool, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from kvstore.client import KVStoreClient
from kvstore.hashing import PoolAddressing
from pantry.common.contract import check_prompt
from pantry.common.engine_info import EngineDescription, EngineLoad

from .engine_metrics import EngineCounters, EngineMetrics
from .loader import LoadedModel
from .pool_transfer import PoolTransfer, layout_fingerprint
from .role_config import EngineRoleConfig
from .runner import ModelRunner


class EngineCore:
    def __init__(
        self, config: EngineRoleConfig, role: str, loaded: LoadedModel, pool: KVStoreClient
    ) -> None:
        self.config = config
        self.loaded = loaded
        model_cfg = loaded.config
        self.max_model_len = model_cfg.max_position_embeddings
        if config.max_model_len:
            self.max_model_len = min(self.max_model_len, config.max_model_len)
        elem = torch.finfo(loaded.dtype).bits // 8
        block_nbytes = (
            model_cfg.num_layers * 2 * config.block_size * model_cfg.num_kv_heads
            * model_cfg.head_dim * elem
        )
        min_blocks = math.ceil(self.max_model_len / config.block_size) + 1
        num_blocks = max(config.kv_cache_bytes // block_nbytes, min_blocks)
        self.runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=config.block_size)
        fingerprint = layout_fingerprint(
            loaded.model_id, loaded.weights_digest, loaded.dtype, config.block_size
        )
        self.addressing = PoolAddressing(
            fingerprint, config.block_size, hash_seed=config.hash_seed, salt=config.salt
        )
        self.pool = pool
        self.metrics = EngineMetrics(role, config.engine_id)
        self.metrics.watch_cache(lambda: self.runner.allocator.num_free,
                                 lambda: self.runner.kv.num_blocks)
        self.transfer = PoolTransfer(pool, self.runner.kv, fingerprint, self.metrics.pool)
        self.description = EngineDescription(
            role=role,
            engine_id=config.engine_id,
            model_id=loaded.model_id,
            fingerprint=fingerprint,
            block_size=config.block_size,
            vocab_size=model_cfg.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=tuple(model_cfg.eos_token_ids),
            hash_seed=config.hash_seed,
        )

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def check_prompt(self, tokens: Sequence[int], max_tokens: int) -> None:
        """The conductor checked this already; an engine still refuses what its model cannot
        run, whoever sent it."""
        check_prompt(tokens, max_tokens, vocab_size=self.description.vocab_size,
                     max_model_len=self.max_model_len)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def resume_point(self, loaded_blocks: int, num_tokens: int) -> int:
        """Where computing starts after `loaded_blocks` came from the pool. The last prompt token
        is always computed, even when its block was loaded, because its logits give the next
        token; rewriting its KV slot stores the same values."""
        return min(loaded_blocks * self.block_size, num_tokens - 1)

    def record(self, computed: int, pooled: int, ttft_seconds: float) -> None:
        """One request reached its first token: `computed` + `pooled` prompt tokens."""
        self.metrics.record_request(computed, pooled, ttft_seconds)

    @contextmanager
    def busy(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.add_busy(time.perf_counter() - start)

    def counters(self) -> EngineCounters:
        return self.metrics.counters()

    def load(self, *, waiting: int, running: int) -> EngineLoad:
        c = self.counters()
        return EngineLoad(
            waiting=waiting,
            running=running,
            free_blocks=self.runner.allocator.num_free,
            total_blocks=self.runner.kv.num_blocks,
            requests_total=c.requests_total,
            computed_tokens_total=c.computed_tokens_total,
            pool_tokens_total=c.pool_tokens_total,
            busy_seconds_total=c.busy_seconds_total,
        )
