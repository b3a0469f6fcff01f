"""Placement and admission as pure code: which prefill and decode engine serve a request, and
whether it is refused early because its SLOs are already predicted missed (Mooncake §7).

No I/O and no clock: the caller passes what it knows now (the request, where its cached prefix
lives, each engine's predicted queue and fitted models). The live conductor
(`conductor.scheduler`) and the simulator (`conductor.simulator`) call this same code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .perf_model import DecodeModel, PrefillModel, TransferModel


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int
    max_tokens: int
    block_size: int

    @property
    def full_blocks(self) -> int:
        return self.prompt_tokens // self.block_size


@dataclass(frozen=True)
class PrefixMatch:
    """The request's cached prefix: `tiers[i]` says where pool block i lives (`pool`, `remote`,
    ...); `local[engine_id]` counts the leading blocks already on that engine's own host (its
    cache or its host's pool segment), which it reads at the `local` tier's cost instead."""

    tiers: tuple[str, ...] = ()
    local: Mapping[str, int] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    def reusable(self, engine_id: str) -> int:
        return max(self.blocks, self.local.get(engine_id, 0))


@dataclass(frozen=True)
class PrefillView:
    engine_id: str
    queue_s: float
    model: PrefillModel
    up: bool = True


@dataclass(frozen=True)
class DecodeView:
    engine_id: str
    running: int                 # sequences in its batch (as last known plus ours since)
    context_tokens: int          # their KV, in tokens
    free_blocks: int | None      # None: not reported yet, assumed to fit
    block_size: int
    model: DecodeModel
    up: bool = True


@dataclass(frozen=True)
class Choice:
    engine_id: str
    predicted_s: float           # TTFT for prefill, TBT for decode


def predict_ttft(req: RequestShape, match: PrefixMatch, e: PrefillView,
                 transfer: TransferModel) -> float:
    """Queue + prefill of the tokens not cached + moving the cached blocks not local to e."""
    local = min(match.local.get(e.engine_id, 0), req.full_blocks)
    reused = min(match.reusable(e.engine_id), req.full_blocks)
    prefix = reused * req.block_size
    # The last prompt token is always computed: its logits give the first token.
    computed = max(req.prompt_tokens - prefix, 1)
    moved = local * transfer.seconds("local") + sum(
        transfer.seconds(t) for t in match.tiers[local:reused])
    return e.queue_s + e.model.predict(computed, prefix) + moved


def predict_tbt(req: RequestShape, e: DecodeView) -> float:
    return e.model.predict(e.running + 1, e.context_tokens + req.prompt_tokens)


def fits(req: RequestShape, e: DecodeView) -> bool:
    need = math.ceil((req.prompt_tokens + req.max_tokens) / max(e.block_size, 1))
    return e.free_blocks is None or e.free_blocks >= need


class PlacementPolicy(Protocol):
    name: str
    # What the engines of the system a policy comes from can reuse: only their own local cache
    # ('local': Mooncake's baselines, Fig. 5) or the whole pool ('pool'). Live engines always
    # read the pool; the simulator builds for each policy the cluster it assumes.
    reach: str

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None: ...
    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None: ...


def _decode_candidates(req: RequestShape, engines: Sequence[DecodeView]) -> list[DecodeView]:
    """Engines that are up, those where the sequence fits first (all of them if none fits)."""
    up = [e for e in engines if e.up]
    fitting = [e for e in up if fits(req, e)]
    return fitting or up


def _by_key(req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
            transfer: TransferModel, key: object) -> Choice | None:
    best: tuple[object, PrefillView] | None = None
    for e in engines:
        if not e.up:
            continue
        k = key(e)  # type: ignore[operator]
        if best is None or k < best[0]:  # type: ignore[operator]
            best = (k, e)
    if best is None:
        return None
    e = best[1]
    return Choice(e.engine_id, predict_ttft(req, match, e, transfer))


class RandomPolicy:
    name = "random"
    reach = "local"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None:
        up = [e for e in engines if e.up]
        if not up:
            return None
        e = self._rng.choice(up)
        return Choice(e.engine_id, predict_ttft(req, match, e, transfer))

    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
        cands = _decode_candidates(req, engines)
        if not cands:
            return None
        e = self._rng.choice(cands)
        return Choice(e.engine_id, predict_tbt(req, e))


class RoundRobinPolicy:
    name = "round_robin"
    reach = "local"

    def __init__(self) -> None:
        self._next_prefill = 0
        self._next_decode = 0

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None:
        for _ in range(len(engines)):
            e = engines[self._next_prefill % len(engines)]
            self._next_prefill += 1
            if e.up:
                return Choice(e.engine_id, predict_ttft(req, match, e, transfer))
        return None

    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
        for _ in range(len(engines)):
            e = engines[self._next_decode % len(engines)]
            self._next_decode += 1
            if e.up:
                return Choice(e.engine_id, predict_tbt(req, e))
        return None


def _least_loaded_decode(req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
    cands = _decode_candidates(req, engines)
    if not cands:
        return None
    e = min(cands, key=lambda d: (d.running, d.context_tokens))
    return Choice(e.engine_id, predict_tbt(req, e))


class LoadPolicy:
    """The shortest predicted queue, whatever is cached where."""

    name = "load"
    reach = "local"

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None:
        return _by_key(req, match, engines, transfer, lambda e: e.queue_s)

    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
        return _least_loaded_decode(req, engines)


class CachePolicy:
    """Local cache-aware: the lowest queue plus compute of what is not on the engine's own host,
    as if the rest of the pool were out of its reach; the prediction it reports is the full one
    (the engine still reads the pool)."""

    name = "cache"
    reach = "local"

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None:
        local_only = PrefixMatch((), match.local)
        return _by_key(req, match, engines, transfer,
                       lambda e: predict_ttft(req, local_only, e, transfer))

    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
        return _least_loaded_decode(req, engines)


class PantryPolicy:
    """Prefill: the lowest predicted TTFT (queue + compute of what is not cached there + moving
    what is cached elsewhere), so a hot prefix spreads to other engines, which pull it from the
    pool, as soon as waiting for its holder costs more than recomputing or moving it. Decode: the
    lowest predicted TBT among engines where the sequence fits."""

    name = "pantry"
    reach = "pool"

    def prefill(self, req: RequestShape, match: PrefixMatch, engines: Sequence[PrefillView],
                transfer: TransferModel) -> Choice | None:
        return _by_key(req, match, engines, transfer,
                       lambda e: predict_ttft(req, match, e, transfer))

    def decode(self, req: RequestShape, engines: Sequence[DecodeView]) -> Choice | None:
        cands = _decode_candidates(req, engines)
        if not cands:
            return None
        e = min(cands, key=lambda d: (predict_tbt(req, d), d.running))
        return Choice(e.engine_id, predict_tbt(req, e))


POLICY_NAMES = ("random", "round_robin", "load", "cache", "pantry")


def make_policy(name: str, seed: int = 0) -> PlacementPolicy:
    if name == "random":
        return RandomPolicy(seed)
    policies: dict[str, type[PlacementPolicy]] = {
        "round_robin": RoundRobinPolicy, "load": LoadPolicy, "cache": CachePolicy,
        "pantry": PantryPolicy}
    if name not in policies:
        raise ValueError(f"unknown placement policy {name!r}; one of {', '.join(POLICY_NAMES)}")
    return policies[name]()


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 0.0   # 0: no SLO
    tbt_s: float = 0.0


def rejection(slo: Slo, prefill: Choice | None, decode: Choice | None) -> str:
    """'' to admit; else which SLO the prediction already misses ('ttft' or 'tbt')."""
    if slo.ttft_s > 0 and prefill is not None and prefill.predicted_s > slo.ttft_s:
        return "ttft"
    if slo.tbt_s > 0 and decode is not None and decode.predicted_s > slo.tbt_s:
        return "tbt"
    return ""
