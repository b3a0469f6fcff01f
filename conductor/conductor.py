"""The conductor's domain logic: tokenize, look up the cached prefix, place, stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

from engine.detokenizer import IncrementalDetokenizer
from engine.model_files import load_tokenizer
from engine.tokenizer import Tokenizer
from kvstore.hashing import PoolAddressing
from pantry.common.contract import check_prompt
from pantry.common.engine_info import EngineDescription
from pantry.common.errors import InvalidRequest, Overloaded, Unavailable
from pantry.common.sampling import SamplingParams

from .config import ConductorConfig
from .engines import DecodeChunk, DecodeClient, PrefillClient, PrefillResult
from .fleet import Fleet
from .metrics import TTFT_BUCKETS, Metrics
from .requests import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    PromptAccepted,
    TokensGenerated,
    Usage,
)
from .scheduler import Scheduler
from .stop_strings import StopStringMatcher

log = logging.getLogger(__name__)

async def _no_chunks() -> AsyncIterator[DecodeChunk]:
    return
    yield


class Conductor:
    def __init__(self, config: ConductorConfig, tokenizer: Tokenizer | None, fleet: Fleet) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.fleet = fleet
        ref = fleet.reference
        self.info: EngineDescription = ref
        self.model_id = config.served_model_name or ref.model_id
        self.addressing = PoolAddressing(ref.fingerprint, ref.block_size, hash_seed=ref.hash_seed)
        self.scheduler: Scheduler[object] = Scheduler(config.ttft_slo_s)
        self._inflight = 0
        self._poller: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        m = self.metrics
        m.counter("pantry_requests_total", "Requests finished, by route and outcome.")
        m.counter("pantry_prompt_tokens_total", "Prompt tokens received.")
        m.counter("pantry_cached_tokens_total", "Prompt tokens served from the KV pool.")
        m.counter("pantry_generated_tokens_total", "Tokens generated.")
        m.counter("pantry_request_errors_total", "Requests refused or failed, by kind.")
        m.histogram("pantry_ttft_seconds", "Time to first token.", TTFT_BUCKETS)

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
                     max_model_len=self.info.max_model_len, field=req.prompt_field)
        return prompt, req.sampling.resolve(asked)

    def check_model(self, req: GenerationRequest) -> None:
        if req.model and req.model != self.model_id:
            raise InvalidRequest(
                "model", f"'{req.model}' is not served here; use '{self.model_id}' (/v1/models)"
            )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yields PromptAccepted, then TokensGenerated events, then GenerationFinished.
        Raises InvalidRequest / Overloaded / Unavailable before or while streaming."""
        try:
            prompt, params = self.admit(req)
        except InvalidRequest:
            self.metrics.inc("pantry_request_errors_total", kind="invalid")
            raise
        if self._inflight >= self.config.max_concurrent_requests:
            self.metrics.inc("pantry_request_errors_total", kind="overloaded")
            raise Overloaded(
                f"{self._inflight} requests in flight (max_concurrent_requests); retry later"
            )
        self._inflight += 1
        try:
            async for event in self._serve(req, prompt, params):
                yield event
        finally:
            self._inflight -= 1

    async def _cached_blocks(self, keys: list[str]) -> int:
        if not keys:
            return 0
        try:
            match = await asyncio.to_thread(self.fleet.pool.match_prefix, keys)
        except Exception as exc:  # the pool being down costs speed, never correctness
            log.warning("match_prefix failed, treating as a miss: %s", exc)
            return 0
        return match.matched

    async def _serve(
        self, req: GenerationRequest, prompt: tuple[int, ...], params: SamplingParams
    ) -> AsyncIterator[GenerationEvent]:
        start = time.perf_counter()
        yield PromptAccepted(prompt)
        keys = self.addressing.block_keys(prompt, req.tenant)
        matched = await self._cached_blocks(keys)
        # A full hit leaves at most a partial block to compute: decode does that itself.
        direct = matched == len(keys)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        stops = StopStringMatcher(req.sampling.stop)
        generated: list[int] = []
        first_token: int | None = None
        cached = 0
        ttft = 0.0
        finish = ""
        fallback = False
        if not direct:
            result = await self._prefill(req, prompt, matched, params)
            if result is None:
                # No prefill engine could take it: decode computes the prompt itself, in chunks
                # between its decode steps. Slower first token, same answer.
                direct = fallback = True
            else:
                first_token = result.first_token
                cached = result.pool_tokens
        dst = self.scheduler.choose_decode(
            self.fleet.decodes, len(prompt) + params.max_tokens  # type: ignore[arg-type]
        )
        if dst is None:
            raise Unavailable("no decode engine is up")
        decoder: DecodeClient = dst.client  # type: ignore[assignment]
        dst.inflight_requests += 1
        try:
            skip_first = first_token is not None
            # The prefill's first token goes out before decode has even pulled the blocks.
            if first_token is not None:
                ttft = time.perf_counter() - start
                generated.append(first_token)
                text = stops.push(detok.push(first_token)) if detok else ""
                yield TokensGenerated((first_token,), text)
                if stops.stopped:
                    finish = "stop"  # done already: decode is never called
            chunks = (
                decoder.decode(req.request_id, prompt, req.tenant, params, first_token)
                if not finish else _no_chunks()
            )
            async for chunk in chunks:
                if direct and chunk.pool_tokens:
                    cached = chunk.pool_tokens
                new = list(chunk.token_ids)
                if skip_first and new:
                    new = new[1:]
                    skip_first = False
                if new:
                    if not generated:
                        ttft = time.perf_counter() - start
                    generated.extend(new)
                    text = "".join(detok.push(t) for t in new) if detok else ""
                    text = stops.push(text) if text else ""
                    yield TokensGenerated(tuple(new), text)
                    if stops.stopped:
                        finish = "stop"
                        break
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                    break
        finally:
            dst.inflight_requests -= 1
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            cached_tokens=cached,
            ttft_s=ttft,
            prefill_skipped=direct,
        )
        route = "decode_fallback" if fallback else (
            "decode_direct" if direct else "prefill_then_decode")
        m = self.metrics
        m.inc("pantry_requests_total", route=route, finish=finish or "unknown")
        m.inc("pantry_prompt_tokens_total", len(prompt))
        m.inc("pantry_cached_tokens_total", cached)
        m.inc("pantry_generated_tokens_total", len(generated))
        m.observe("pantry_ttft_seconds", ttft, route=route)
        yield GenerationFinished(finish or "stop", stops.flush(), usage)

    async def _prefill(
        self, req: GenerationRequest, prompt: tuple[int, ...], matched: int,
        params: SamplingParams,
    ) -> PrefillResult | None:
        """Runs the prompt on the prefill engine with the lowest predicted TTFT; None when no
        prefill engine is up or the chosen one failed."""
        placement = self.scheduler.choose_prefill(
            self.fleet.prefills,  # type: ignore[arg-type]
            uncached=len(prompt) - matched * self.info.block_size,
            cached_blocks=matched,
        )
        if placement is None:
            log.warning("%s: no prefill engine is up; decode computes the prompt", req.request_id)
            return None
        if self.scheduler.misses_slo(placement):
            self.metrics.inc("pantry_request_errors_total", kind="slo")
            raise Overloaded(
                f"predicted TTFT {placement.predicted_ttft_s:.2f}s exceeds the SLO "
                f"{self.config.ttft_slo_s:.2f}s; retry later"
            )
        st = placement.engine
        client: PrefillClient = st.client  # type: ignore[assignment]
        st.inflight_tokens += len(prompt)
        st.inflight_requests += 1
        t0 = time.perf_counter()
        try:
            result = await client.prefill(req.request_id, prompt, req.tenant, params)
        except Unavailable as exc:
            st.up = False  # until the next poll says otherwise
            log.warning("%s: %s; decode computes the prompt", req.request_id, exc)
            return None
        finally:
            st.inflight_tokens -= len(prompt)
            st.inflight_requests -= 1
        self.scheduler.observe_prefill(st, result.computed_tokens, time.perf_counter() - t0)
        return result

    def metrics_text(self) -> str:
        """The conductor's own series plus what it last polled from every role, so one scrape
        shows the whole system."""
        gauges = self.fleet.gauges()
        gauges["pantry_inflight_requests"] = ("Requests being served.",
                                              {(): float(self._inflight)})
        return self.metrics.render(gauges)
