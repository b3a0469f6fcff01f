"""The parts of a serving engine that prefill and decode share: model, cache, the local prefix
cache over it, the pool and the background writer into it, metrics."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvstore.client import KVStoreClient
from kvstore.hashing import PoolAddressing
from pantry.common.contract import check_prompt
from pantry.common.engine_info import EngineDescription, EngineLoad

from .cpu_split import AdaptiveCpus
from .engine_metrics import EngineCounters, EngineMetrics
from .loader import LoadedModel
from .pool_transfer import PoolTransfer, layout_fingerprint
from .role_config import EngineRoleConfig
from .runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class LoopIteration:
    """What `EngineCore.busy` is told about the iteration it times."""

    computed: bool = True


@dataclass(frozen=True)
class PromptBlocks:
    """The blocks a prompt was given: `local` leading ones already hold its KV (this engine's
    prefix cache), the rest are fresh."""

    block_ids: list[int]
    local: int


class EngineCore:
    def __init__(
        self, config: EngineRoleConfig, role: str, loaded: LoadedModel, pool: KVStoreClient
    ) -> None:
        self.config = config
        self.loaded = loaded
        # Set by the server with `pantry local`'s CPU board; polled by the loop.
        self.cpus: AdaptiveCpus | None = None
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
        self.runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=config.block_size,
                                  cuda_graphs=config.cuda_graphs and role == "decode")
        fingerprint = layout_fingerprint(
            loaded.model_id, loaded.weights_digest, loaded.dtype, config.block_size,
            pool_kv_dtype=config.pool_kv_dtype,
        )
        self.addressing = PoolAddressing(
            fingerprint, config.block_size, hash_seed=config.hash_seed, salt=config.salt
        )
        self.pool = pool
        self.metrics = EngineMetrics(role, config.engine_id)
        self.metrics.watch_cache(lambda: self.runner.allocator.num_free,
                                 lambda: self.runner.kv.num_blocks)
        self.metrics.cached_blocks.set_function(lambda: self.runner.allocator.num_cached)
        graphs = self.runner.graphs
        self.metrics.cuda_graph_steps.set_function(lambda: 0 if graphs is None else graphs.replays)
        self.transfer = PoolTransfer(pool, self.runner.kv, fingerprint, self.metrics.pool,
                                     config.pool_kv_dtype)
        # Writes into the pool run here, off the caller's thread. Single-threaded: a second
        # OpenMP team spinning beside the compute thread's slows every step on a small machine.
        self._writer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{role}-write",
            initializer=lambda: torch.set_num_threads(1),
        )
        self._writes_lock = threading.Lock()
        self._writes: set[Future[int]] = set()
        self._writing: set[str] = set()  # keys handed to the writer, not yet written
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
            salt=config.salt,
            host_id=pool.host_id,
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

    def claim_prompt_blocks(self, keys: Sequence[str], num_tokens: int, num_blocks: int,
                            reserve: int = 0) -> PromptBlocks | None:
        """`num_blocks` blocks for a prompt of `num_tokens` whose full blocks are `keys`: the
        longest run of them this engine still holds, then fresh ones. None (nothing taken) when
        fewer than that plus `reserve` blocks are free.

        When the hits cover the whole prompt, the last token is still computed (its logits give
        the next token); its block is copied into a fresh one first, so a block other sequences
        may share is never written.
        """
        pool = self.runner.allocator
        hits = pool.cached_prefix(keys)
        copy_last = bool(hits) and len(hits) * self.block_size >= num_tokens
        shared = hits[:-1] if copy_last else hits
        fresh = num_blocks - len(shared)
        if pool.num_free - pool.unreferenced(hits) < fresh + reserve:
            return None
        pool.touch(hits)
        ids = shared + pool.allocate(fresh)
        if copy_last:
            self.runner.kv.copy_block(hits[-1], ids[len(shared)])
            pool.free([hits[-1]])
        self.metrics.local_hit_blocks.inc(len(hits))
        return PromptBlocks(ids, len(hits))

    def cache_blocks(self, keys: Sequence[str], block_ids: Sequence[int], start: int,
                     end: int) -> None:
        """Index blocks [start, end) of a sequence, full and final, under their keys."""
        pool = self.runner.allocator
        for i in range(start, end):
            pool.cache(keys[i], block_ids[i])

    def release_blocks(self, block_ids: Sequence[int]) -> None:
        """A sequence is done with its blocks. Last block first: what it shares with others
        (its prefix) is the last of its blocks to be evicted."""
        self.runner.allocator.free(reversed(block_ids))

    def store_in_background(self, keys: Sequence[str], block_ids: Sequence[int]) -> None:
        """One batched put of these cache blocks into the pool, on the writer thread. The blocks
        are referenced until written, so freeing them meanwhile cannot get them overwritten."""
        if not keys:
            return
        pool = self.runner.allocator
        pool.touch(block_ids)
        keys, block_ids = list(keys), list(block_ids)
        with self._writes_lock:
            self._writing.update(keys)

        def write() -> int:
            try:
                return self.transfer.store(keys, block_ids)
            finally:
                pool.free(block_ids)
                with self._writes_lock:
                    self._writing.difference_update(keys)

        future = self._writer.submit(write)
        with self._writes_lock:
            self._writes.add(future)
        future.add_done_callback(self._written)

    def _written(self, future: Future[int]) -> None:
        with self._writes_lock:
            self._writes.discard(future)
        if future.exception() is not None:
            log.error("writing blocks to the pool failed", exc_info=future.exception())

    def flush_writes(self) -> None:
        """Waits until every block handed to `store_in_background` so far is written."""
        self._writer.submit(lambda: None).result()

    def being_written(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is on its way to the pool from this engine."""
        with self._writes_lock:
            return [key in self._writing for key in keys]

    @property
    def pending_writes(self) -> int:
        with self._writes_lock:
            return len(self._writes)

    def close(self) -> None:
        """Finishes the pending writes, then closes the pool client."""
        self._writer.shutdown(wait=True)
        self.pool.close()

    def record(self, computed: int, pooled: int, ttft_seconds: float) -> None:
        """One request reached its first token: `computed` + `pooled` prompt tokens."""
        self.metrics.record_request(computed, pooled, ttft_seconds)

    @contextmanager
    def busy(self) -> Iterator[LoopIteration]:
        """Around one loop iteration, on the loop thread: its wall time, and how much of it the
        thread was not running (its CPU time is the rest). The caller marks an iteration that
        found nothing to compute, which is not a step."""
        iteration = LoopIteration()
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield iteration
        finally:
            wall = time.perf_counter() - start
            self.metrics.add_busy(wall, wall - (time.thread_time() - cpu),
                                  step=iteration.computed)

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
