"""The conductor's domain logic: tokenize, look up the cached prefix, place, stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.model_files import load_tokenizer
from engine.tokenizer import Tokenizer
from kvstore.hashing import PoolAddressing
from pantry.common.contract import check_prompt
from pantry.common.engine_info import EngineDescription
from pantry.common.errors import InvalidRequest, Overloaded, Unavailable
from pantry.common.sampling import SamplingParams

from .config import ConductorConfig
from .engines import DecodeClient, PrefillClient, PrefillResult
from .fleet import Fleet
from .metrics import (
    DECODE_DIRECT,
    DECODE_FALLBACK,
    DECODE_SHORT,
    PREFILL_THEN_DECODE,
    ConductorMetrics,
)
from .requests import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    PromptAccepted,
    TokensGenerated,
    Usage,
)
from .scheduler import EngineState, Placement, Scheduler
from .stop_strings import StopStringMatcher

log = logging.getLogger(__name__)


class SloMiss(Overloaded):
    """Refused before any work: the predicted TTFT or TBT already misses its SLO."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _DecodeState:
    """What a request's decode stream has said so far, across engines if one fails."""

    cached: int
    finish: str = ""


def _error_kind(exc: InvalidRequest | Overloaded | Unavailable) -> str:
    if isinstance(exc, SloMiss):
        return "slo"
    if isinstance(exc, Overloaded):
        return "overloaded"
    return "invalid" if isinstance(exc, InvalidRequest) else "unavailable"


class _Output:
    """One request's output so far: token ids, text past the stop strings, token timings."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...], start: float,
                 metrics: ConductorMetrics) -> None:
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer else None
        self._stops = StopStringMatcher(stop)
        self._start = self._last = start
        self._metrics = metrics
        self.token_ids: list[int] = []
        self.ttft_s = 0.0

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def add(self, ids: tuple[int, ...]) -> TokensGenerated:
        now = time.perf_counter()
        if self.token_ids:
            self._metrics.tbt.observe(now - self._last)
        else:
            self.ttft_s = now - self._start
        self._last = now
        self.token_ids.extend(ids)
        text = "".join(self._detok.push(t) for t in ids) if self._detok else ""
        return TokensGenerated(ids, self._stops.push(text) if text else "")

    def flush(self) -> str:
        """Text held back for a stop string that never came."""
        return self._stops.flush()


class Conductor:
    def __init__(self, config: ConductorConfig, tokenizer: Tokenizer | None, fleet: Fleet) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.fleet = fleet
        ref = fleet.reference
        self.info: EngineDescription = ref
        self.model_id = config.served_model_name or ref.model_id
        self.addressing = PoolAddressing(ref.fingerprint, ref.block_size, hash_seed=ref.hash_seed,
                                         salt=ref.salt)
        self.scheduler: Scheduler[object] = Scheduler(config.ttft_slo_s, config.placement_policy,
                                                      config.tbt_slo_s)
        self._inflight = 0
        self._poller: asyncio.Task[None] | None = None
        self.metrics = ConductorMetrics(fleet, lambda: self._inflight)

    # ---- life cycle ---------------------------------------------------------------------
    @classmethod
    async def connect(cls, config: ConductorConfig, wait_s: float = 120.0) -> Conductor:
        fleet = await Fleet.connect(config, wait_s)
        tokenizer = await asyncio.to_thread(load_tokenizer, config.model)
        conductor = cls(config, tokenizer, fleet)
        conductor._poller = asyncio.create_task(fleet.poll_forever())
        return conductor

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.fleet.close()

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, req: GenerationRequest) -> tuple[int, ...]:
        if req.token_ids is not None:
            ids = req.token_ids
        elif self.tokenizer is None:
            raise InvalidRequest(
                req.prompt_field, "this model has no tokenizer; send the prompt as token ids"
            )
        elif req.messages is not None:
            if not req.messages:
                raise InvalidRequest(req.prompt_field, "is empty; send at least one message")
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in req.messages]
                )
            except Exception as exc:
                raise InvalidRequest(req.prompt_field, f"chat template failed: {exc}") from exc
            ids = tuple(self.tokenizer.encode(text))
        else:
            ids = tuple(self.tokenizer.encode(req.text or ""))
        return ids

    def admit(self, req: GenerationRequest) -> tuple[tuple[int, ...], SamplingParams]:
        """The one validation of a request: model, prompt, limit and sampling settings, each
        error naming the field as the caller's API spells it."""
        self.check_model(req)
        prompt = self.tokenize(req)
        asked = req.sampling.max_tokens
        if asked is None:  # the API's default, cut to what the context leaves
            room = self.info.max_model_len - len(prompt)
            asked = min(req.default_max_tokens or self.config.default_max_tokens, max(room, 1))
        check_prompt(prompt, asked, vocab_size=self.info.vocab_size,
                     max_model_len=self.info.max_model_len, field=req.prompt_field,
                     max_tokens_field=req.max_tokens_field)
        return prompt, req.sampling.resolve(asked)

    def check_model(self, req: GenerationRequest) -> None:
        if req.model and req.model != self.model_id:
            raise InvalidRequest(
                "model", f"'{req.model}' is not served here; use '{self.model_id}' (/v1/models)"
            )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yields PromptAccepted, then TokensGenerated events, then GenerationFinished.
        Raises InvalidRequest / Overloaded / Unavailable before or while streaming. Closing
        the generator early (aclose) ends the engine's decode stream at once."""
        try:
            prompt, params = self.admit(req)
            if self._inflight >= self.config.max_concurrent_requests:
                raise Overloaded(
                    f"{self._inflight} requests in flight (max_concurrent_requests); retry later"
                )
            self._inflight += 1
            try:
                async with contextlib.aclosing(self._serve(req, prompt, params)) as events:
                    async for event in events:
                        yield event
            finally:
                self._inflight -= 1
        except (InvalidRequest, Overloaded, Unavailable) as exc:
            self.metrics.request_errors.labels(kind=_error_kind(exc)).inc()
            raise

    async def _cached_blocks(self, keys: list[str]) -> tuple[str, ...]:
        """The host of each leading block the pool holds (as many as it holds)."""
        if not keys:
            return ()
        try:
            match = await asyncio.to_thread(self.fleet.pool.match_prefix, keys)
        except Exception as exc:  # the pool being down costs speed, never correctness
            log.warning("match_prefix failed, treating as a miss: %s", exc)
            return ()
        hosts = [n.host_id for n in match.nodes]
        return tuple(hosts[i] for i in match.node_index)

    async def _serve(
        self, req: GenerationRequest, prompt: tuple[int, ...], params: SamplingParams
    ) -> AsyncGenerator[GenerationEvent, None]:
        start = time.perf_counter()
        keys = self.addressing.block_keys(prompt, req.tenant)
        block_hosts = await self._cached_blocks(keys)
        matched = len(block_hosts)
        route = self._route(len(prompt), matched, len(keys))
        placement = None
        if route == PREFILL_THEN_DECODE:
            placement = self.scheduler.choose_prefill(
                self.fleet.prefills, len(prompt), block_hosts, time.monotonic())  # type: ignore[arg-type]
        self._admit_on_slos(placement, len(prompt), params)
        # Refusals come before this event, so HTTP can still answer 429 rather than a stream.
        yield PromptAccepted(prompt)
        prefilled: PrefillResult | None = None
        if route == PREFILL_THEN_DECODE:
            prefilled = await self._prefill(req, prompt, block_hosts, params, placement)
            if prefilled is None:
                # No prefill engine could take it: decode computes the prompt itself, in chunks
                # between its decode steps. Slower first token, same answer.
                route = DECODE_FALLBACK
        out = _Output(self.tokenizer, req.sampling.stop, start, self.metrics)
        state = _DecodeState(prefilled.pool_tokens if prefilled else 0)
        try:
            first_token = None
            if prefilled is not None:
                # The prefill's first token goes out before decode has even pulled the blocks.
                first_token = prefilled.first_token
                yield out.add((first_token,))
            failure: Unavailable | None = None
            while not out.stopped and not state.finish:
                dst = self.scheduler.choose_decode(
                    self.fleet.decodes, len(prompt) + params.max_tokens,  # type: ignore[arg-type]
                    len(prompt))
                if dst is None:
                    raise failure or Unavailable("no decode engine is up")
                streamed = len(out.token_ids)
                try:
                    async with contextlib.aclosing(self._decode_on(
                            dst, req, prompt, params, first_token, out, state)) as events:
                        async for event in events:
                            yield event
                    break
                except Unavailable as exc:
                    dst.up = False  # out of rotation until a poll finds it answering again
                    if len(out.token_ids) > streamed:
                        raise  # it streamed tokens: another engine would repeat or diverge
                    log.warning("%s: %s; retrying on another decode engine",
                                req.request_id, exc)
                    failure = exc
            if out.stopped:
                state.finish = "stop"
        except (GeneratorExit, asyncio.CancelledError):
            self._count(route, "cancelled", len(prompt), state.cached, out)
            raise
        self._count(route, state.finish or "unknown", len(prompt), state.cached, out)
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=len(out.token_ids),
            cached_tokens=state.cached,
            ttft_s=out.ttft_s,
            prefill_skipped=route != PREFILL_THEN_DECODE,
        )
        yield GenerationFinished(state.finish or "stop", out.flush(), usage)

    def _route(self, prompt_tokens: int, matched_blocks: int, full_blocks: int) -> str:
        if matched_blocks == full_blocks:
            return DECODE_DIRECT  # at most a partial block is left: decode computes it
        left = prompt_tokens - matched_blocks * self.addressing.block_size
        if left <= self.config.decode_prefill_tokens:
            return DECODE_SHORT
        return PREFILL_THEN_DECODE

    def _admit_on_slos(self, placement: Placement[object] | None, prompt_tokens: int,
                       params: SamplingParams) -> None:
        """Early rejection (Mooncake §7): refuse before any work when the chosen prefill's
        predicted TTFT or the chosen decode's predicted TBT already misses its SLO."""
        cfg = self.config
        if placement is not None and self.scheduler.misses_slo(placement):
            raise SloMiss(
                f"predicted TTFT {placement.predicted_ttft_s:.2f}s exceeds the SLO "
                f"{cfg.ttft_slo_s:.2f}s; retry later",
                retry_after_s=placement.predicted_ttft_s - cfg.ttft_slo_s)
        if cfg.tbt_slo_s <= 0:
            return
        choice = self.scheduler.decode_choice(
            self.fleet.decodes, prompt_tokens + params.max_tokens,  # type: ignore[arg-type]
            prompt_tokens)
        if choice is not None and self.scheduler.misses_tbt(choice[1]):
            raise SloMiss(f"predicted TBT {choice[1] * 1000:.1f}ms exceeds the SLO "
                          f"{cfg.tbt_slo_s * 1000:.1f}ms; retry later")

    async def _decode_on(
        self, dst: EngineState[object], req: GenerationRequest, prompt: tuple[int, ...],
        params: SamplingParams, first_token: int | None, out: _Output, state: _DecodeState,
    ) -> AsyncGenerator[TokensGenerated, None]:
        """One decode engine's stream; raises Unavailable when the engine fails."""
        decoder: DecodeClient = dst.client  # type: ignore[assignment]
        batch = dst.inflight_requests + 1
        dst.inflight_requests += 1
        began: float | None = None
        steps = 0
        try:
            chunks = decoder.decode(req.request_id, prompt, req.tenant, params, first_token)
            async with contextlib.aclosing(chunks):
                skip_first = first_token is not None  # decode repeats it
                async for chunk in chunks:
                    if first_token is None and chunk.pool_tokens:
                        state.cached = chunk.pool_tokens
                    new = chunk.token_ids
                    if skip_first and new:
                        new, skip_first = new[1:], False
                    if new:
                        if began is None:
                            began = time.monotonic()
                        else:
                            steps += len(new)
                        yield out.add(new)
                        if out.stopped:
                            break
                    if chunk.finish_reason:
                        state.finish = chunk.finish_reason
                        break
        finally:
            dst.inflight_requests -= 1
        if began is not None:
            self.scheduler.decoded(dst, batch, steps, time.monotonic() - began)

    def _count(self, route: str, finish: str, prompt_tokens: int, cached: int,
               out: _Output) -> None:
        m = self.metrics
        m.requests.labels(route=route, finish=finish).inc()
        m.prompt_tokens.inc(prompt_tokens)
        m.cached_tokens.inc(cached)
        m.generated_tokens.inc(len(out.token_ids))
        if out.token_ids:
            m.ttft.labels(route=route).observe(out.ttft_s)

    async def _prefill(
        self, req: GenerationRequest, prompt: tuple[int, ...], block_hosts: tuple[str, ...],
        params: SamplingParams, placement: Placement[object] | None,
    ) -> PrefillResult | None:
        """Runs the prompt on `placement`'s engine; an engine that fails is out of rotation at
        once and the prompt goes to the next best. None when no prefill engine is left up."""
        while placement is not None:
            result = await self._prefill_on(req, prompt, params, placement)
            if result is not None:
                return result
            placement = self.scheduler.choose_prefill(
                self.fleet.prefills, len(prompt), block_hosts, time.monotonic())  # type: ignore[arg-type]
        log.warning("%s: no prefill engine is up; decode computes the prompt", req.request_id)
        return None

    async def _prefill_on(
        self, req: GenerationRequest, prompt: tuple[int, ...], params: SamplingParams,
        placement: Placement[object],
    ) -> PrefillResult | None:
        st = placement.engine
        client: PrefillClient = st.client  # type: ignore[assignment]
        st.inflight_tokens += len(prompt)
        st.inflight_requests += 1
        self.scheduler.dispatched(st, placement, time.monotonic())
        result: PrefillResult | None = None
        try:
            result = await client.prefill(req.request_id, prompt, req.tenant, params)
        except Unavailable as exc:
            st.up = False  # until the next poll says otherwise
            log.warning("%s: %s", req.request_id, exc)
            return None
        finally:
            st.inflight_tokens -= len(prompt)
            st.inflight_requests -= 1
            # Fitted on service time only (the ledger knows what it queued behind).
            self.scheduler.completed(st, result.computed_tokens if result else 0,
                                     result.pool_tokens if result else 0, time.monotonic())
        return result
