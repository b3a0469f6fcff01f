"""Continuous-batching decode: sequences join when their prompt KV is in the cache (found in this
engine's prefix cache, else pulled from the pool, the rest computed in chunks between decode
steps), generate one token per step, and write back every full block their own output completes:
one batched put per step, on the core's writer thread, which no step waits for.

A sequence holds blocks for what it has computed, plus one more as its output reaches a new
block. When a running sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are released (its full ones stay indexed in this engine's
prefix cache, and are in the pool or on their way there) and it goes back to the head of the
queue. Readmitted, it takes back what this engine still holds, pulls what the pool has and
recomputes the rest, then continues where it stopped: the same tokens as without preemption.

A request that carries a first token comes from a prefill engine (a handoff): what its pull
waits for and takes is `decode.prompt_pull`'s. With every block of the prompt in place, nothing
of it is computed: the first token is given, so the last prompt token's logits are not needed,
and the sequence starts with the first token's own step, one query row like any decode step.
The prompt's partial last block (its tail) is never indexed or stored as a full block: once the
output fills that block, it is stored under its full key like any block the output completes."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from concurrent.futures import wait

import torch

from engine.block_keys import KeyChain
from engine.engine_loop import EngineLoop
from engine.role_core import EngineCore
from engine.runner import SeqStep
from engine.sampling import Sampler, make_generator
from engine.step_trace import StepMark, StepTrace
from engine.stopping import StopChecker
from pantry.common.errors import InvalidRequest, Overloaded, Unavailable

from .config import DecodeLimits
from .prompt_pull import PromptPull, is_handoff, wants_tail
from .sequence import DecodeEvent, DecodeJob, SeqStatus, Sequence

log = logging.getLogger(__name__)

class EngineStopped(Unavailable):
    """The engine is shutting down and takes no new sequences."""


class QueueFull(Overloaded):
    """The engine already holds `max_waiting` queued requests."""


class SequenceHandle:
    def __init__(self, seq: Sequence, engine: DecodeEngine) -> None:
        self._seq = seq
        self._engine = engine

    def events(self, timeout: float | None = None) -> Iterator[DecodeEvent]:
        while True:
            event = self._seq.events.get(timeout=timeout)
            yield event
            if event.finish_reason or event.error:
                return

    def cancel(self) -> None:
        self._seq.cancelled.set()
        self._engine._wake()


class DecodeEngine(EngineLoop):
    """`background=True` runs the loop on a thread of its own (in-process use). A server runs it
    on the main thread instead (`run()`): torch's OpenMP pool parallelises the many small ops
    of a decode step only there, a decode step on another thread takes ~1.7x as long."""

    def __init__(
        self, core: EngineCore, limits: DecodeLimits | None = None, *, background: bool = True
    ) -> None:
        # Pulling a long prompt's blocks takes about as long as a decode step: done on the
        # loop's puller, so the sequences already generating do not wait for it.
        super().__init__(core, "decode")
        self.limits = limits or DecodeLimits()
        if core.runner.graphs is not None:  # captured now, not in the first steps served
            core.runner.graphs.capture(self.limits.max_running)
        self._sampler = Sampler()
        self._stops = StopChecker(core.description.eos_token_ids)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._pull = PromptPull(core, self.limits.handoff_wait_s, lambda: self._stopped)
        self._trace = (StepTrace(self.limits.step_trace, core.config.engine_id)
                       if self.limits.step_trace else None)
        self._begin(background)

    # ---- called from server threads -------------------------------------------------------
    def submit(self, job: DecodeJob) -> SequenceHandle:
        core = self.core
        core.check_prompt(job.token_ids, job.sampling.max_tokens)
        if job.first_token is not None and not 0 <= job.first_token < core.description.vocab_size:
            raise InvalidRequest("first_token", f"{job.first_token} is outside the vocabulary")
        # Hashed here, on the caller's thread: the loop only extends the chain block by block.
        chain = KeyChain(core.addressing.hasher(job.tenant), job.token_ids)
        tail = chain.tail_key(job.token_ids) if job.first_token is not None else None
        seq = Sequence(job=job, generator=make_generator(job.sampling.seed), chain=chain,
                       tail_key=tail)
        with self._cv:
            if self._stopped:
                raise EngineStopped(f"decode engine {core.config.engine_id} is stopping")
            if len(self._waiting) >= self.limits.max_waiting:
                raise QueueFull(
                    f"decode engine {core.config.engine_id} has {len(self._waiting)} requests "
                    "queued; retry later or add decode engines"
                )
            self._waiting.append(seq)
            self._cv.notify()
        return SequenceHandle(seq, self)

    def load(self) -> tuple[int, int]:
        with self._cv:
            return len(self._waiting), len(self._active)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop; returns once stop is requested."""
        while True:
            with self._cv:
                if not self._waiting and not self._active:
                    self._computing(False)
                while not self._stopped and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopped:
                    break
            try:
                with self.core.busy() as iteration:
                    iteration.computed = stepped = self._iteration()
                if not stepped:
                    self._wait_for_pulls()
            except Exception as exc:  # keep serving: fail the batch, not the process
                log.exception("decode step failed")
                for seq in list(self._active):
                    self._finish(seq, error=f"decode step failed: {exc}")
        for seq in [*self._active, *self._waiting]:
            seq.events.put(DecodeEvent(error="decode engine stopped"))
        if self._trace is not None:
            self._trace.close()

    def _iteration(self) -> bool:
        """One decode step over the batch; False when there was nothing to compute."""
        for seq in [s for s in self._active if s.cancelled.is_set()]:
            self._finish(seq, reason="")
        self._admit()
        self._collect_pulls()
        self._grow()
        steps: list[SeqStep] = []
        members: list[tuple[Sequence, int]] = []
        budget = self.limits.chunk_tokens
        if not any(s.status is SeqStatus.RUNNING for s in self._active):
            budget = max(budget, self.limits.idle_chunk_tokens)
        for seq in self._active:
            table = tuple(seq.block_ids)
            if seq.status is SeqStatus.RUNNING:
                steps.append(SeqStep((seq.output[-1],), seq.num_computed, table))
                members.append((seq, 1))
            elif seq.status is SeqStatus.FILLING and budget > 0:
                chunk = seq.fill[seq.num_computed : seq.num_computed + budget]
                budget -= len(chunk)
                steps.append(SeqStep(tuple(chunk), seq.num_computed, table))
                members.append((seq, len(chunk)))
        # Pulls alone are not computing: a prefill engine computing their blocks keeps every CPU.
        self._computing(bool(steps))
        if not steps:
            return False
        mark = self._trace.begin() if self._trace is not None else None
        logits = self.core.runner.step(steps)
        self._advance(members, logits)
        if mark is not None:
            self._traced(mark, steps, members)
        return True

    def _traced(self, mark: StepMark, steps: list[SeqStep],
                members: list[tuple[Sequence, int]]) -> None:
        assert self._trace is not None
        cpus = self.core.cpus
        self._trace.end(
            mark, sequences=len(steps), tokens=sum(n for _, n in members),
            positions=sum(s.start_pos + len(s.token_ids) for s in steps),
            pulling=sum(1 for s in self._active if s.status is SeqStatus.LOADING),
            confined=cpus.confined if cpus is not None else None)

    def _wait_for_pulls(self) -> None:
        """Nothing to compute: sleep until a pull finishes (it notifies), not counted as busy."""
        with self._cv:
            pulling = [s.pull for s in self._active if s.status is SeqStatus.LOADING]
            if pulling and not any(f is not None and f.done() for f in pulling):
                self._cv.wait(timeout=1.0)

    def _admit(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft().events.put(DecodeEvent(finish_reason="cancelled"))
                if not self._waiting or len(self._active) >= self.limits.max_running:
                    return
                seq = self._waiting[0]
                fill = seq.fill_tokens()
                keys = seq.chain.keys[: len(fill) // core.block_size]
                # One block kept free for each running sequence, whose output may need one next
                # step: admitting into the last blocks would only preempt at once.
                claim = core.claim_prompt_blocks(
                    keys, len(fill), core.blocks_for(len(fill)), reserve=len(self._active))
                if claim is None:
                    return
                self._waiting.popleft()
                self._active.append(seq)
            seq.fill = fill
            seq.block_ids = claim.block_ids
            seq.local_blocks = claim.local
            if claim.local == len(keys) and not wants_tail(seq):
                # A repeat on this engine: nothing to pull.
                self._prompt_loaded(seq, claim.local, whole=is_handoff(seq))
                continue
            seq.status = SeqStatus.LOADING
            seq.pull = self._puller.submit(self._pull, seq)
            seq.pull.add_done_callback(lambda _f: self._wake())

    def _prompt_loaded(self, seq: Sequence, loaded: int, whole: bool = False) -> None:
        """`loaded` leading blocks of the fill hold its KV; the rest is computed in chunks.
        `whole`: a handoff's whole prompt does (its tail too, if it has one), so the given first
        token is emitted at once."""
        seq.stored_blocks = loaded
        if whole:
            seq.num_computed = len(seq.fill)
            if seq.tail_key is not None:
                self.core.metrics.tails_pulled.inc()
        else:
            seq.num_computed = self.core.resume_point(loaded, len(seq.fill))
        if not seq.output:
            seq.pool_tokens = seq.num_computed
        seq.status = SeqStatus.FILLING
        self._index_full_blocks(seq)
        if whole:
            self._start_from_first_token(seq)

    def _start_from_first_token(self, seq: Sequence) -> None:
        """The prompt's KV is all in place: the handoff's first token is emitted without a
        step, and the next step computes its KV and samples the second token."""
        sampling = seq.job.sampling
        if seq.generator is not None and not sampling.greedy:
            # Every other path samples a first token from this generator (and a handoff
            # replaces it with the given one). One draw taken the same way (the draws do not
            # depend on the logits) keeps a seeded request's later tokens the same on all.
            width = self.core.description.vocab_size
            self._sampler.sample(torch.zeros(1, width), [sampling], [seq.generator])
        assert seq.job.first_token is not None
        self._emit(seq, seq.job.first_token, first=True)
        if seq.status is SeqStatus.FINISHED:
            self._release(seq)

    def _grow(self) -> None:
        """Every running sequence gets the block its next token goes into, preempting the most
        recently admitted sequences while none is free."""
        bs = self.core.block_size
        alloc = self.core.runner.allocator
        for seq in list(self._active):
            while (seq.status is SeqStatus.RUNNING and seq in self._active
                   and len(seq.block_ids) * bs <= seq.num_computed):
                if alloc.num_free:
                    seq.block_ids += alloc.allocate(1)
                    continue
                victims = [s for s in self._active
                           if s.status in (SeqStatus.RUNNING, SeqStatus.FILLING)]
                self._preempt(victims[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue without its blocks; its output so far is kept."""
        log.info("%s: preempted after %d tokens to free KV blocks", seq.job.request_id,
                 len(seq.output))
        with self._cv:
            self._active.remove(seq)
            self._waiting.appendleft(seq)
        self.core.release_blocks(seq.block_ids)
        seq.block_ids = []
        seq.status = SeqStatus.WAITING
        seq.num_computed = seq.cached_blocks = seq.local_blocks = 0
        seq.pull = None
        seq.preemptions += 1
        self.core.metrics.preemptions.inc()

    def _collect_pulls(self) -> None:
        for seq in list(self._active):  # a sequence done at its first token leaves at once
            if seq.status is not SeqStatus.LOADING or seq.pull is None or not seq.pull.done():
                continue
            try:
                loaded, whole = seq.pull.result()
            except Exception:  # whatever failed, the prompt can still be computed
                log.exception("pulling %s from the pool failed", seq.job.request_id)
                loaded, whole = seq.local_blocks, False
            self._prompt_loaded(seq, loaded, whole)

    def _advance(self, members: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        to_sample: list[tuple[int, Sequence]] = []
        for row, (seq, n) in enumerate(members):
            seq.num_computed += n
            if seq.status is SeqStatus.FILLING and seq.num_computed == len(seq.fill):
                if seq.output:  # resumed after a preemption: its next input is known already
                    seq.status = SeqStatus.RUNNING
                    continue
                to_sample.append((row, seq))
            elif seq.status is SeqStatus.RUNNING:
                to_sample.append((row, seq))
        if to_sample:
            if len(to_sample) < logits.shape[0]:  # a chunk mid-prompt samples nothing
                rows = torch.tensor([r for r, _ in to_sample], device=logits.device)
                logits = logits.index_select(0, rows)
            tokens = self._sampler.sample(
                logits,
                [s.job.sampling for _, s in to_sample],
                [s.generator for _, s in to_sample],
            )
            for (_, seq), token in zip(to_sample, tokens, strict=True):
                first = seq.status is SeqStatus.FILLING
                if first and seq.job.first_token is not None:
                    token = seq.job.first_token
                self._emit(seq, token, first)
        keys: list[str] = []
        block_ids: list[int] = []
        for seq, _ in members:
            self._index_full_blocks(seq)
            if seq.cached_blocks > seq.stored_blocks:
                keys += seq.chain.keys[seq.stored_blocks : seq.cached_blocks]
                block_ids += seq.block_ids[seq.stored_blocks : seq.cached_blocks]
                seq.stored_blocks = seq.cached_blocks
        self.core.store_in_background(keys, block_ids)
        for seq in [s for s in self._active if s.status is SeqStatus.FINISHED]:
            self._release(seq)

    def _emit(self, seq: Sequence, token: int, first: bool) -> None:
        now = time.perf_counter()
        seq.output.append(token)
        event = DecodeEvent(token_ids=(token,))
        if first:
            seq.status = SeqStatus.RUNNING
            computed = len(seq.prompt) - seq.pool_tokens
            self.core.record(computed=computed, pooled=seq.pool_tokens,
                             ttft_seconds=now - seq.submitted_at)
            event = DecodeEvent((token,), pool_tokens=seq.pool_tokens, computed_tokens=computed)
        else:
            self.core.metrics.tbt.observe(now - seq.last_token_at)
        seq.last_token_at = now
        reason = self._stops.check(token, len(seq.output), seq.job.sampling)
        if reason:
            event = DecodeEvent(
                event.token_ids, reason, event.pool_tokens, event.computed_tokens
            )
            seq.status = SeqStatus.FINISHED
        seq.events.put(event)

    def _index_full_blocks(self, seq: Sequence) -> None:
        """Blocks the sequence's computed KV has filled join the prefix cache, their keys carried
        forward from the last one."""
        bs = self.core.block_size
        full = seq.num_computed // bs
        if full <= seq.cached_blocks:
            return
        chain = seq.chain
        for i in range(len(chain.keys), full):
            chain.append(seq.token_slice(i * bs, (i + 1) * bs))
        self.core.cache_blocks(chain.keys, seq.block_ids, seq.cached_blocks, full)
        seq.cached_blocks = full

    def _finish(self, seq: Sequence, reason: str = "", error: str = "") -> None:
        reason = reason or ("" if error else "cancelled")
        seq.events.put(DecodeEvent(finish_reason=reason, error=error))
        seq.status = SeqStatus.FINISHED
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        with self._cv:
            if seq in self._active:
                self._active.remove(seq)
        if seq.pull is not None:
            wait([seq.pull])  # the puller may still be writing into these blocks
        if seq.block_ids:
            self.core.release_blocks(seq.block_ids)
            seq.block_ids = []
