"""The live driver of the placement code: engine states as the conductor knows them (polled
load, what it sent and has not seen back, fitted models, predicted queues), turned into the
views `conductor.placement` decides on. The clock is passed in by the caller."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pantry.common.engine_info import EngineDescription, EngineLoad

from .perf_model import DecodeModel, PrefillModel, QueueLedger, TransferModel
from .placement import (
    Choice,
    DecodeView,
    PrefillView,
    PrefixMatch,
    RequestShape,
    Slo,
    make_policy,
    rejection,
)

C = TypeVar("C")
M = TypeVar("M", PrefillModel, DecodeModel)


def peer_scaled(models: Sequence[M]) -> list[M]:
    """The models to predict with: an engine not measured yet at the middle scale of those that
    are. Its own guess is a CPU-class default; beside a measured peer much faster than that it
    would never be chosen, so it would never serve the request that measures it (two decode
    engines of a tiny model: all eight requests went to the one measured first)."""
    seen = sorted(m.scale for m in models if m.observed)
    if not seen:
        return list(models)
    middle = seen[len(seen) // 2]
    return [m if m.observed else dataclasses.replace(m, scale=middle) for m in models]


@dataclass
class EngineState(Generic[C]):
    client: C
    info: EngineDescription
    load: EngineLoad | None = None
    up: bool = True
    inflight_tokens: int = 0            # prompt tokens this conductor has sent and not seen back
    inflight_requests: int = 0
    prefill_model: PrefillModel = field(default_factory=PrefillModel)
    decode_model: DecodeModel = field(default_factory=DecodeModel)
    ledger: QueueLedger = field(default_factory=QueueLedger)


@dataclass(frozen=True)
class Placement(Generic[C]):
    engine: EngineState[C]
    predicted_ttft_s: float


def prefix_match(engines: Sequence[EngineState[C]], block_hosts: Sequence[str]) -> PrefixMatch:
    """Every cached block at the `pool` tier, and for each engine the leading blocks on its own
    host, which it reads at the `local` tier (shared memory, no network). An engine that names
    no host (an older one) reads everything at the pool tier."""
    local: dict[str, int] = {}
    for i, st in enumerate(engines):
        host = st.info.host_id
        n = 0
        while host and n < len(block_hosts) and block_hosts[n] == host:
            n += 1
        if n:
            local[str(i)] = n
    return PrefixMatch(("pool",) * len(block_hosts), local)


class Scheduler(Generic[C]):
    def __init__(self, ttft_slo_s: float = 0.0, policy: str = "pantry",
                 tbt_slo_s: float = 0.0, seed: int = 0) -> None:
        self.ttft_slo_s = ttft_slo_s
        self.slo = Slo(ttft_slo_s, tbt_slo_s)
        self.policy = make_policy(policy, seed)
        self.transfer = TransferModel()

    @staticmethod
    def _shape(engines: list[EngineState[C]], prompt_tokens: int,
               max_tokens: int = 0) -> RequestShape:
        block = engines[0].info.block_size if engines else 1
        return RequestShape(prompt_tokens, max_tokens, block)

    def choose_prefill(self, engines: list[EngineState[C]], prompt_tokens: int,
                       block_hosts: Sequence[str], now: float) -> Placement[C] | None:
        """`block_hosts`: the host of each leading block the pool holds. None when no engine
        is up."""
        if not engines:
            return None
        models = peer_scaled([st.prefill_model for st in engines])
        views = [PrefillView(str(i), st.ledger.queue_s(now), model, st.up)
                 for i, (st, model) in enumerate(zip(engines, models, strict=True))]
        choice = self.policy.prefill(self._shape(engines, prompt_tokens),
                                     prefix_match(engines, block_hosts), views, self.transfer)
        return None if choice is None else Placement(engines[int(choice.engine_id)],
                                                     choice.predicted_s)

    def choose_decode(self, engines: list[EngineState[C]], tokens_reserved: int,
                      prompt_tokens: int = 0) -> EngineState[C] | None:
        choice = self.decode_choice(engines, tokens_reserved, prompt_tokens)
        return None if choice is None else choice[0]

    def decode_choice(self, engines: list[EngineState[C]], tokens_reserved: int,
                      prompt_tokens: int = 0) -> tuple[EngineState[C], float] | None:
        """The decode engine and its predicted TBT with this request in its batch."""
        if not engines:
            return None
        views = []
        models = peer_scaled([st.decode_model for st in engines])
        for i, (st, model) in enumerate(zip(engines, models, strict=True)):
            load = st.load
            views.append(DecodeView(
                str(i), running=st.inflight_requests + (load.waiting if load else 0),
                context_tokens=0, free_blocks=load.free_blocks if load else None,
                block_size=st.info.block_size, model=model, up=st.up))
        req = RequestShape(prompt_tokens, tokens_reserved - prompt_tokens, 1)
        # Fit is judged on each engine's own block size: reserve in tokens, not blocks.
        choice = self.policy.decode(req, views)
        return None if choice is None else (engines[int(choice.engine_id)], choice.predicted_s)

    def misses_tbt(self, predicted_tbt_s: float) -> bool:
        return rejection(self.slo, None, Choice("", predicted_tbt_s)) == "tbt"

    @staticmethod
    def decoded(st: EngineState[C], batch: int, tokens: int, seconds: float) -> None:
        """Fits the engine's step model on a finished stream: `tokens` steps after its first
        chunk took `seconds`, in a batch of about `batch` sequences."""
        if tokens > 0:
            st.decode_model.observe(batch, 0, seconds / tokens)

    def misses_slo(self, placement: Placement[C]) -> bool:
        return rejection(self.slo, Choice("", placement.predicted_ttft_s), None) == "ttft"

    @staticmethod
    def dispatched(st: EngineState[C], placement: Placement[C], now: float) -> None:
        st.ledger.dispatch(now, placement.predicted_ttft_s - st.ledger.queue_s(now))

    @staticmethod
    def completed(st: EngineState[C], computed_tokens: int, prefix_tokens: int,
                  now: float) -> None:
        """Fits the engine's model on the service time alone: the time it waited behind
        requests sent before it is the ledger's, not the model's."""
        service = st.ledger.complete(now)
        st.prefill_model.observe(computed_tokens, prefix_tokens, service)

