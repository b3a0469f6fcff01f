"""Prefill: take the cached prefix from this engine's own prefix cache, else from the pool, compute
the rest, store every new full block, and return the first token for the decode handoff.

Prompts are computed together in token-budgeted batches: each forward pass takes up to
`chunk_tokens` prompt tokens, first-come first-served, so a short prompt queued behind a long one
shares its passes instead of waiting for all of it, and several short prompts share one pass.
Every block a pass completes goes to the pool at once, on the core's background writer, while
the next pass computes; the prompt's last pass also sends its partial last block, under its tail
key, so decode need not compute it. The first token is returned as soon as the last pass ends;
the last blocks may still be on their way to the pool then. Decode knows (the request carries
the first token) and waits for them briefly before it computes anything itself
(`decode.engine`).
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from engine.block_keys import KeyChain
from engine.engine_loop import EngineLoop
from engine.errors import OutOfBlocks
from engine.role_core import EngineCore
from engine.runner import SeqStep
from engine.sampling import Sampler, make_generator
from engine.step_trace import StepTrace
from pantry.common.errors import Unavailable
from pantry.common.sampling import SamplingParams

from .config import PrefillLimits

log = logging.getLogger(__name__)

# How long the loop sleeps when prompts wait for blocks the background writer still holds.
_BLOCKS_RETRY_S = 0.005


class PrefillStopped(Unavailable):
    """The engine is shutting down and takes no new prompts."""


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
    stored_blocks: int  # full prompt blocks in the pool, or handed to the writer to put there


@dataclass(eq=False)
class _Prompt:
    """One prompt inside the engine, from admission until its first token."""

    job: PrefillJob
    arrived: float
    future: Future[PrefillOutcome] = field(default_factory=Future)
    keys: list[str] = field(default_factory=list)
    tail_key: str | None = None  # its partial last block's (None: it fills whole blocks)
    block_ids: list[int] = field(default_factory=list)
    loaded: int = 0          # leading blocks that held their KV already (local or pool)
    local: int = 0           # of those, found in this engine's own prefix cache
    start: int = 0           # first computed position
    num_computed: int = 0    # positions whose KV is in the cache
    queued_blocks: int = 0   # leading full blocks indexed here and handed to the writer
    pull: Future[int] | None = None  # loading its cached prefix from the pool, beside the passes
    ready: bool = False      # its cached prefix is in place: it takes part in passes
    first_pass: float = 0.0  # perf_counter when its first pass began (0: none yet)
    pass_s: float = 0.0      # seconds of the passes it took part in

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.job.token_ids


class PrefillEngine(EngineLoop):
    """`background=True` runs the loop on a thread of its own (in-process use). A server runs it
    on the main thread instead (`run()`), where torch's OpenMP pool serves it best."""

    def __init__(self, core: EngineCore, limits: PrefillLimits | None = None, *,
                 background: bool = True) -> None:
        # A prompt's cached prefix is pulled on the loop's puller while the passes of the
        # others go on.
        super().__init__(core, "prefill")
        limits = limits or PrefillLimits()
        self.chunk_tokens = limits.chunk_tokens
        self._trace = (StepTrace(limits.step_trace, core.config.engine_id)
                       if limits.step_trace else None)
        self._sampler = Sampler()
        self._queue: collections.deque[_Prompt] = collections.deque()
        self._running: list[_Prompt] = []
        if core.cpus is not None:
            # A pass over a long prompt takes seconds: a decode engine that starts computing
            # meanwhile gets its CPUs back within a layer.
            core.runner.model.between_layers = lambda: self._computing(True)
        self._begin(background)

    # ---- called from server threads -------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Prompts in the engine, those computing included."""
        with self._cv:
            return len(self._queue) + len(self._running)

    def load(self) -> tuple[int, int]:
        """(waiting, running): queued prompts, and prompts whose passes are under way."""
        with self._cv:
            return len(self._queue), len(self._running)

    def submit(self, job: PrefillJob) -> Future[PrefillOutcome]:
        core = self.core
        core.check_prompt(job.token_ids, job.sampling.max_tokens)
        needed = core.blocks_for(len(job.token_ids))
        if needed > core.runner.kv.num_blocks:
            raise OutOfBlocks(f"a {len(job.token_ids)}-token prompt needs {needed} KV blocks, "
                              f"the cache has {core.runner.kv.num_blocks}")
        p = _Prompt(job, time.perf_counter())
        chain = KeyChain(core.addressing.hasher(job.tenant), job.token_ids)
        p.keys, p.tail_key = chain.keys, chain.tail_key(job.token_ids)
        with self._cv:
            if self._stopped:
                raise PrefillStopped(f"prefill engine {core.config.engine_id} is stopping")
            self._queue.append(p)
            self._cv.notify()
        return p.future

    def prefill(self, job: PrefillJob) -> PrefillOutcome:
        """The first token of `job`, once its last pass is computed."""
        return self.submit(job).result()

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop; returns once stop is requested."""
        while True:
            with self._cv:
                if not self._queue and not self._running:
                    self._computing(False)
                while not self._stopped and not self._queue and not self._running:
                    self._cv.wait()
                if self._stopped:
                    break
            try:
                self._admit()
                self._collect_pulls()
                if not any(p.ready for p in self._running):
                    self._computing(False)
                    # Pulls still running, or every free block still held by the writer:
                    # either frees up shortly (a finished pull also wakes the loop).
                    with self._cv:
                        self._cv.wait(timeout=_BLOCKS_RETRY_S)
                    continue
                self._computing(True)
                with self.core.busy():
                    self._pass()
            except Exception as exc:  # keep serving: fail this batch, not the process
                log.exception("prefill pass failed")
                for p in list(self._running):
                    self._fail(p, exc)
        with self._cv:
            left = [*self._running, *self._queue]
            self._running.clear()
            self._queue.clear()
        for p in left:
            self._fail(p, PrefillStopped("prefill engine stopped"))
        if self._trace is not None:
            self._trace.close()

    def _admit(self) -> None:
        """Queued prompts take their blocks, first come first served, while blocks last; each
        loads its cached prefix (this engine's cache, else the pool) before its first pass."""
        core = self.core
        while True:
            with self._cv:
                if not self._queue:
                    return
                p = self._queue[0]
                n = len(p.tokens)
                claim = core.claim_prompt_blocks(p.keys, n, core.blocks_for(n))
                if claim is None:
                    return
                self._queue.popleft()
            p.block_ids, p.local = claim.block_ids, claim.local
            with self._cv:
                self._running.append(p)
            if p.local == len(p.keys):  # all held here: nothing to pull
                self._prefix_loaded(p, p.local)
                continue
            p.pull = self._puller.submit(self._pull, p)
            p.pull.add_done_callback(lambda _f: self._wake())

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _pull(self, p: _Prompt) -> int:
        """On the puller thread: this prompt's own fresh blocks only. The leading blocks now
        in the cache, local ones included."""
        return p.local + self.core.transfer.load(p.keys[p.local:],
                                                 p.block_ids[p.local : len(p.keys)])

    def _collect_pulls(self) -> None:
        for p in list(self._running):
            if p.ready or p.pull is None or not p.pull.done():
                continue
            try:
                loaded = p.pull.result()
            except Exception as exc:
                self._fail(p, exc)
                continue
            self._prefix_loaded(p, loaded)

    def _prefix_loaded(self, p: _Prompt, loaded: int) -> None:
        """`loaded` leading blocks hold their KV: the prompt joins the passes after them."""
        p.loaded = loaded
        p.start = p.num_computed = self.core.resume_point(loaded, len(p.tokens))
        self.core.cache_blocks(p.keys, p.block_ids, 0, loaded)
        self._restore_evicted(p)
        p.queued_blocks = loaded
        p.ready = True

    def _restore_evicted(self, p: _Prompt) -> None:
        """Blocks found in this engine's own cache were in the pool when written, but the pool
        may have evicted them since: decode, told they are there, would wait for them. Those
        the pool lacks are written again."""
        if not p.local:
            return
        # In flight first, then sealed: a write that ends between the two is counted in one.
        writing = self.core.being_written(p.keys[: p.local])
        try:
            sealed = self.core.pool.match_prefix(p.keys[: p.local]).matched
        except Exception:  # the pool is down: nothing to restore them into
            log.warning("pool unreachable: not checking %d local blocks", p.local)
            return
        lost = [i for i in range(sealed, p.local) if not writing[i]]
        self.core.store_in_background([p.keys[i] for i in lost], [p.block_ids[i] for i in lost])

    def _pass(self) -> None:
        """One forward pass over up to `chunk_tokens` prompt tokens of the running prompts."""
        steps: list[SeqStep] = []
        members: list[tuple[_Prompt, int]] = []
        budget = self.chunk_tokens
        for p in self._running:
            if budget <= 0:
                break
            if not p.ready:
                continue
            chunk = p.tokens[p.num_computed : p.num_computed + budget]
            budget -= len(chunk)
            steps.append(SeqStep(chunk, p.num_computed, tuple(p.block_ids)))
            members.append((p, len(chunk)))
        mark = self._trace.begin() if self._trace is not None else None
        began = time.perf_counter()
        logits = self.core.runner.step(steps)
        took = time.perf_counter() - began
        for p, _ in members:
            p.first_pass = p.first_pass or began
            p.pass_s += took
        done: list[tuple[int, _Prompt]] = []
        keys: list[str] = []
        block_ids: list[int] = []
        for row, (p, n) in enumerate(members):
            p.num_computed += n
            full = min(p.num_computed // self.core.block_size, len(p.keys))
            if full > p.queued_blocks:
                self.core.cache_blocks(p.keys, p.block_ids, p.queued_blocks, full)
                keys += p.keys[p.queued_blocks : full]
                block_ids += p.block_ids[p.queued_blocks : full]
                p.queued_blocks = full
            if p.num_computed == len(p.tokens):
                done.append((row, p))
                if p.tail_key is not None:
                    # Its partial last block, for decode, in the same put as its last full
                    # ones. Never indexed here: this engine's prefix cache holds full blocks
                    # only, under their chained keys.
                    keys.append(p.tail_key)
                    block_ids.append(p.block_ids[len(p.keys)])
                    self.core.metrics.tails_stored.inc()
        # One put for every block this pass completed; the writer holds them until written, so
        # a tail block released with its prompt is not reused before then.
        self.core.store_in_background(keys, block_ids)
        if done:
            rows = [row for row, _ in done]
            firsts = self._sampler.sample(
                logits[rows], [p.job.sampling for _, p in done],
                [make_generator(p.job.sampling.seed) for _, p in done])
            for (_, p), first in zip(done, firsts, strict=True):
                self._finish(p, first)
        if mark is not None and self._trace is not None:
            cpus = self.core.cpus
            with self._cv:
                waiting = len(self._queue)
            self._trace.end(
                mark, sequences=len(steps), tokens=sum(n for _, n in members),
                positions=sum(s.start_pos + len(s.token_ids) for s in steps),
                confined=cpus.confined if cpus is not None else None,
                stored=len(keys), finished=len(done), waiting=waiting)

    def _finish(self, p: _Prompt, first: int) -> None:
        core = self.core
        n = len(p.tokens)
        with self._cv:
            self._running.remove(p)
        core.release_blocks(p.block_ids)
        ttft = time.perf_counter() - p.arrived
        core.record(computed=n - p.start, pooled=p.start, ttft_seconds=ttft)
        # The times split what the engine spent on a prompt: waiting (queue, prefix pull)
        # before its first pass, and the passes it shared; a client's TTFT beyond their sum
        # was spent outside this engine.
        log.info(
            "prefill %s: %d tokens, %d blocks held here, %d pulled, %d computed tokens, "
            "%d new blocks%s being stored; %.1f ms in the engine: %.1f ms before its first "
            "pass, %.1f ms in passes",
            p.job.request_id, n, p.local, p.loaded - p.local, n - p.start,
            len(p.keys) - p.loaded, "" if p.tail_key is None else " and its tail", ttft * 1e3,
            ((p.first_pass or p.arrived) - p.arrived) * 1e3, p.pass_s * 1e3,
        )
        p.future.set_result(PrefillOutcome(first, p.start, n - p.start, p.queued_blocks))

    def _fail(self, p: _Prompt, exc: BaseException) -> None:
        with self._cv:
            if p in self._running:
                self._running.remove(p)
        if p.pull is not None:
            wait([p.pull])  # the puller may still be writing into its blocks
        if p.block_ids:
            self.core.release_blocks(p.block_ids)
            p.block_ids = []
        if not p.future.done():
            p.future.set_exception(exc)
