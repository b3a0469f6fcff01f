"""Prefill: take the cached prefix from this engine's own prefix cache, else from the pool, compute
the rest in chunks, store every new full block, and return the first token for the decode
handoff."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from engine.errors import OutOfBlocks
from engine.role_core import EngineCore
from engine.runner import SeqStep
from engine.sampling import Sampler, make_generator
from pantry.common.sampling import SamplingParams

from .config import PrefillLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    token_ids: tuple[int, ...]
    tenant: str
    sampling: SamplingParams


@dataclass(frozen=True)
class PrefillOutcome:
    first_token: int
    pool_tokens: int
    computed_tokens: int
    stored_blocks: int


class PrefillEngine:
    def __init__(self, core: EngineCore, limits: PrefillLimits | None = None) -> None:
        chunk_tokens = (limits or PrefillLimits()).chunk_tokens
        self.core = core
        self.chunk_tokens = chunk_tokens
        self._sampler = Sampler()
        # One prompt at a time: on a CPU a second prompt would only slow both down.
        self._compute = threading.Lock()
        self._state = threading.Lock()
        self._waiting = 0
        core.metrics.watch_load(self.load)

    @property
    def waiting(self) -> int:
        """Prompts in the engine, the one computing included."""
        with self._state:
            return self._waiting

    def load(self) -> tuple[int, int]:
        """(waiting, running): at most one prompt computes, the rest queue behind it."""
        waiting = self.waiting
        return max(waiting - 1, 0), min(waiting, 1)

    def prefill(self, job: PrefillJob) -> PrefillOutcome:
        core = self.core
        core.check_prompt(job.token_ids, job.sampling.max_tokens)
        arrived = time.perf_counter()
        with self._state:
            self._waiting += 1
        try:
            with self._compute, core.busy():
                return self._run(job, arrived)
        finally:
            with self._state:
                self._waiting -= 1

    def _run(self, job: PrefillJob, arrived: float) -> PrefillOutcome:
        core = self.core
        runner = core.runner
        tokens = job.token_ids
        n = len(tokens)
        keys = core.addressing.block_keys(tokens, job.tenant)
        claim = core.claim_prompt_blocks(keys, n, core.blocks_for(n))
        if claim is None:
            raise OutOfBlocks(f"a {n}-token prompt needs {core.blocks_for(n)} KV blocks, only "
                              f"{runner.allocator.num_free} free")
        block_ids = claim.block_ids
        try:
            local = claim.local
            loaded = local + core.transfer.load(keys[local:], block_ids[local : len(keys)])
            start = core.resume_point(loaded, n)
            logits = None
            table = tuple(block_ids)
            for pos in range(start, n, self.chunk_tokens):
                chunk = tokens[pos : pos + self.chunk_tokens]
                logits = runner.step([SeqStep(tuple(chunk), pos, table)])
            assert logits is not None
            first = self._sampler.sample(
                logits, [job.sampling], [make_generator(job.sampling.seed)]
            )[0]
            ttft = time.perf_counter() - arrived
            core.cache_blocks(keys, block_ids, 0, len(keys))
            stored = core.transfer.store(keys[loaded:], block_ids[loaded : len(keys)])
            core.record(computed=n - start, pooled=start, ttft_seconds=ttft)
            log.info(
                "prefill %s: %d tokens, %d blocks held here, %d pulled, %d computed tokens, "
                "%d/%d new blocks stored",
                job.request_id, n, local, loaded - local, n - start, stored, len(keys) - loaded,
            )
            return PrefillOutcome(first, start, n - start, loaded + stored)
        finally:
            core.release_blocks(block_ids)
