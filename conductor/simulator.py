"""Replays a trace through the placement and admission code against a cost model of a cluster.

The same policy code as the live conductor decides; the cluster's answer comes from
`ClusterSpec`: prefill engines serve FIFO (what the policy predicts as queue is what it gets, as
its models are exactly the cost model's), decode engines batch continuously (a request's TBT is
the step time of the batch it joins). Each prefill engine's host has a cache (its share of the
pool, evicting with a `kvstore.eviction` policy) that receives the prompt's blocks when the
prefill finishes. What a request can reuse is the policy's `reach`: under `local` (the
baselines of Mooncake Fig. 5) only the leading blocks in the chosen engine's own cache, each
engine keeping its own copies; under `pool` the leading blocks held anywhere, another host's
read at the `remote` tier's cost, and each block stored once.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.eviction import BlockHint, EvictionPolicy
from kvstore.eviction import make_policy as make_eviction

from .cost_model import ClusterSpec
from .perf_model import DecodeModel, PrefillModel, QueueLedger, TransferModel
from .placement import (
    DecodeView,
    PrefillView,
    PrefixMatch,
    RequestShape,
    Slo,
    make_policy,
    rejection,
)
from .trace import TraceRequest


class CostModels(Protocol):
    """Where the engines' costs come from: `ClusterSpec` (a data sheet) or
    `calibration.Calibration` (measured on running engines)."""

    def prefill_model(self) -> PrefillModel: ...
    def decode_model(self) -> DecodeModel: ...
    def transfer_model(self) -> TransferModel: ...


@dataclass(frozen=True)
class RequestOutcome:
    ttft_s: float
    tbt_s: float
    reused_blocks: int
    blocks: int
    rejected: str = ""   # '' when served, else the SLO predicted missed


@dataclass(frozen=True)
class PolicyResult:
    name: str
    outcomes: tuple[RequestOutcome, ...]
    duration_s: float
    slo: Slo

    @property
    def served(self) -> list[RequestOutcome]:
        return [o for o in self.outcomes if not o.rejected]

    @property
    def rejected(self) -> int:
        return sum(1 for o in self.outcomes if o.rejected)

    @property
    def hit_rate(self) -> float:
        """Prompt blocks reused from the pool, over every block of every request."""
        total = sum(o.blocks for o in self.outcomes)
        return sum(o.reused_blocks for o in self.outcomes) / total if total else 0.0

    def ttft(self, q: float) -> float:
        return percentile([o.ttft_s for o in self.served], q)

    @property
    def ttft_mean_s(self) -> float:
        served = self.served
        return sum(o.ttft_s for o in served) / len(served) if served else 0.0

    @property
    def tbt_p99_s(self) -> float:
        return percentile([o.tbt_s for o in self.served], 99)

    def _met(self, o: RequestOutcome) -> bool:
        return (not o.rejected and (self.slo.ttft_s <= 0 or o.ttft_s <= self.slo.ttft_s)
                and (self.slo.tbt_s <= 0 or o.tbt_s <= self.slo.tbt_s))

    @property
    def slo_attainment(self) -> float:
        """Requests served within both SLOs, over all requests (a rejection is a miss)."""
        n = len(self.outcomes)
        return sum(self._met(o) for o in self.outcomes) / n if n else 0.0

    @property
    def goodput_rps(self) -> float:
        met = sum(self._met(o) for o in self.outcomes)
        return met / self.duration_s if self.duration_s > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(int(-(-q * len(ordered) // 100)), 1)  # ceil(q n / 100), at least 1
    return ordered[min(rank, len(ordered)) - 1]


class _Segment:
    """One prefill engine's host cache: its share of the pool (DRAM beside the engine)."""

    def __init__(self, capacity: int, eviction: str) -> None:
        self.capacity = capacity
        self.policy: EvictionPolicy = make_eviction(eviction)


class _Decoder:
    def __init__(self) -> None:
        self.active: list[tuple[float, int]] = []  # (finishes at, KV tokens)
        self.context_tokens = 0

    def prune(self, now: float) -> None:
        while self.active and self.active[0][0] <= now:
            _, tokens = heapq.heappop(self.active)
            self.context_tokens -= tokens


class Simulation:
    def __init__(self, spec: ClusterSpec, policy: str, eviction: str = "reuse",
                 early_reject: bool = False, seed: int = 0,
                 models: CostModels | None = None) -> None:
        self.spec = spec
        self.policy = make_policy(policy, seed)
        self.slo = Slo(spec.ttft_slo_s, spec.tbt_slo_s)
        self.early_reject = early_reject
        self.prefill_ids = [f"prefill-{i}" for i in range(spec.prefill_engines)]
        self.decode_ids = [f"decode-{i}" for i in range(spec.decode_engines)]
        self.reach = self.policy.reach
        per_host = max(spec.pool_blocks // spec.prefill_engines, 1)
        self.caches = {e: _Segment(per_host, eviction) for e in self.prefill_ids}
        self.ledgers = {e: QueueLedger() for e in self.prefill_ids}
        self.decoders = {e: _Decoder() for e in self.decode_ids}
        costs: CostModels = models or spec
        self.prefill_model = costs.prefill_model()
        self.decode_model = costs.decode_model()
        self.transfer = costs.transfer_model()
        self._writes: list[tuple[float, int, str, tuple[int, ...]]] = []
        self._seq = itertools.count()

    # ---- the caches ---------------------------------------------------------------------------
    def _holder(self, h: int) -> str | None:
        for e in self.prefill_ids:
            if h in self.caches[e].policy:
                return e
        return None

    def _store(self, engine: str, blocks: Sequence[int]) -> None:
        """The blocks a prefill read or computed, into its host's cache. Under `pool` reach a
        block another host holds stays there (the pool stores a key once) and is refreshed;
        under `local` reach every engine keeps its own copy."""
        seg = self.caches[engine]
        n = len(blocks)
        for i, h in enumerate(blocks):
            hint = BlockHint(depth=i, last=i == n - 1)
            holder = engine
            if self.reach == "pool" and h not in seg.policy:
                holder = self._holder(h) or engine
            self.caches[holder].policy.touch(h, hint)
            if holder == engine:
                while len(seg.policy) > seg.capacity and seg.policy.pop_victim() is not None:
                    pass

    def _flush_writes(self, now: float) -> None:
        while self._writes and self._writes[0][0] <= now:
            _, _, engine, blocks = heapq.heappop(self._writes)
            self._store(engine, blocks)

    def _match(self, hash_ids: Sequence[int]) -> PrefixMatch:
        """Per engine, the leading blocks its own cache holds; under `pool` reach also the
        leading blocks some host holds, each read from the `remote` tier."""
        local: dict[str, int] = {}
        for e in self.prefill_ids:
            policy = self.caches[e].policy
            n = 0
            while n < len(hash_ids) and hash_ids[n] in policy:
                n += 1
            if n:
                local[e] = n
        if self.reach == "local":
            return PrefixMatch((), local)
        n = max(local.values(), default=0)
        while n < len(hash_ids) and self._holder(hash_ids[n]) is not None:
            n += 1
        return PrefixMatch(("remote",) * n, local)

    # ---- one request ------------------------------------------------------------------------
    def step(self, req: TraceRequest) -> RequestOutcome:
        now = req.timestamp_ms / 1000.0
        self._flush_writes(now)
        spec = self.spec
        shape = RequestShape(req.input_length, req.output_length, spec.block_tokens)
        # The partial last block is named too (the trace hashes it); it is reusable only by a
        # prompt that repeats it exactly, so it counts like any block.
        match = self._match(req.hash_ids)
        prefills = [PrefillView(e, self.ledgers[e].queue_s(now), self.prefill_model)
                    for e in self.prefill_ids]
        pre = self.policy.prefill(shape, match, prefills, self.transfer)
        assert pre is not None
        decodes = []
        for e in self.decode_ids:
            d = self.decoders[e]
            d.prune(now)
            free = (spec.kv_capacity_tokens - d.context_tokens) // spec.block_tokens
            decodes.append(DecodeView(e, len(d.active), d.context_tokens, free,
                                      spec.block_tokens, self.decode_model))
        dec = self.policy.decode(shape, decodes)
        assert dec is not None
        reason = rejection(self.slo, pre, dec) if self.early_reject else ""
        if reason:
            return RequestOutcome(0.0, 0.0, 0, len(req.hash_ids), reason)
        reused = match.reusable(pre.engine_id)
        ledger = self.ledgers[pre.engine_id]
        queue = ledger.queue_s(now)
        service = pre.predicted_s - queue  # the cost model is the policy's model: exact
        start = ledger.dispatch(now, service)
        done = start + service
        # Reading refreshes the blocks where they are; the prompt lands in the cache at `done`.
        self._store(pre.engine_id, req.hash_ids[:reused])
        heapq.heappush(self._writes, (done, next(self._seq), pre.engine_id, req.hash_ids))
        d = self.decoders[dec.engine_id]
        tbt = dec.predicted_s
        heapq.heappush(d.active, (done + tbt * req.output_length,
                                  req.input_length + req.output_length))
        d.context_tokens += req.input_length + req.output_length
        return RequestOutcome(done - now, tbt, reused, len(req.hash_ids))

    def finish(self) -> None:
        self._flush_writes(float("inf"))


def simulate(trace: Sequence[TraceRequest], spec: ClusterSpec, policy: str,
             eviction: str = "reuse", early_reject: bool = False, seed: int = 0,
             progress: Callable[[int], None] | None = None,
             models: CostModels | None = None) -> PolicyResult:
    """`models`: the engines' costs when not `spec`'s own (a calibration)."""
    sim = Simulation(spec, policy, eviction, early_reject, seed, models)
    outcomes = []
    for i, req in enumerate(trace):
        outcomes.append(sim.step(req))
        if progress is not None and (i + 1) % 256 == 0:
            progress(256)
    if progress is not None:
        progress(len(trace) % 256)
    sim.finish()
    duration = (trace[-1].timestamp_ms - trace[0].timestamp_ms) / 1000.0 if trace else 0.0
    return PolicyResult(policy, tuple(outcomes), duration, sim.slo)
