"""`pantry replay TRACE --live`: the trace sent to a running Pantry over its OpenAI HTTP API, at
the trace's arrival times (scaled), measured as the simulator reports it.

A trace names blocks, not tokens: block `h` becomes tokens drawn from a generator seeded with
`h`. Equal ids at the same position mean the same prefix, so equal ids give equal tokens and the
trace's prefix sharing is kept.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp

from conductor.calibration import CachedRepeat, Calibration, ColdPrefill, calibrate
from conductor.placement import Slo
from conductor.simulator import PolicyResult, RequestOutcome
from conductor.trace import TraceRequest
from pantry.common.errors import ConfigError

if TYPE_CHECKING:
    from pantry.cli.replay import ReplayOptions

TRACE_BLOCK_TOKENS = 512


def trace_tokens(req: TraceRequest, length_scale: float, vocab_size: int) -> list[int]:
    per_block = max(round(TRACE_BLOCK_TOKENS * length_scale), 1)
    length = max(round(req.input_length * length_scale), 1)
    tokens: list[int] = []
    for h in req.hash_ids:
        if len(tokens) >= length:
            break
        rng = random.Random(h)
        tokens.extend(rng.randrange(3, vocab_size) for _ in range(per_block))
    while len(tokens) < length:  # a trace line with fewer ids than its length needs
        tokens.append(3)
    return tokens[:length]


def _reason(error: object) -> str:
    """What a stream's error event says: 'overloaded' for a refusal, else its message."""
    if not isinstance(error, dict):
        return str(error) or "error"
    if error.get("code") == 429 or "overloaded" in str(error.get("type", "")):
        return "overloaded"
    return str(error.get("message") or error.get("type") or "error")


async def _one(http: aiohttp.ClientSession, url: str, model: str, tokens: list[int],
               max_tokens: int) -> RequestOutcome:
    body = {"model": model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    cached = 0
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status == 429:
            return RequestOutcome(0.0, 0.0, 0, len(tokens), "overloaded")
        if resp.status != 200:
            raise ConfigError(f"url: {url} answered {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[len("data: "):])
            if "error" in msg:
                return RequestOutcome(0.0, 0.0, 0, len(tokens), _reason(msg["error"]))
            if msg.get("usage"):
                details = msg["usage"].get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens", 0))
            # A token chunk has no finish reason yet (the last chunk and usage come after).
            if any(c.get("finish_reason") is None for c in msg.get("choices", [])):
                stamps.append(time.perf_counter())
    if not stamps:
        return RequestOutcome(time.perf_counter() - start, 0.0, cached, len(tokens))
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tbt = sum(gaps) / len(gaps) if gaps else 0.0
    return RequestOutcome(stamps[0] - start, tbt, cached, len(tokens))


async def _model_id(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with http.get(f"{url}/v1/models") as resp:
            return str((await resp.json())["data"][0]["id"])
    except (aiohttp.ClientError, KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"url: no Pantry answers at {url} ({exc})") from exc


# Probe prompt lengths, in blocks, and how often each is sent: enough points for a line through
# noisy timings, few enough to take seconds on a small model.
PROBE_BLOCKS = (2, 4, 8, 16, 24)
PROBE_ROUNDS = 3
PROBE_OUTPUT_TOKENS = 8


async def _probe(url: str, block_tokens: int, vocab_size: int) -> Calibration:
    cold: list[ColdPrefill] = []
    repeats: list[CachedRepeat] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        model = await _model_id(http, url)
        for round_ in range(PROBE_ROUNDS):
            for blocks in PROBE_BLOCKS:
                # Seeds no trace uses (strings, not block ids): every probe starts cold.
                rng = random.Random(f"calibrate:{round_}:{blocks}")
                # One token past the last full block, so the repeat computes a 1-token tail.
                tokens = [rng.randrange(3, vocab_size) for _ in range(blocks * block_tokens + 1)]
                first = await _one(http, url, model, tokens, PROBE_OUTPUT_TOKENS)
                again = await _one(http, url, model, tokens, 1)
                if first.rejected or again.rejected:
                    raise ConfigError(f"url: {url} refused a calibration probe "
                                      f"({first.rejected or again.rejected}); calibrate an "
                                      "idle Pantry")
                cold.append(ColdPrefill(len(tokens), first.ttft_s, first.tbt_s))
                repeats.append(CachedRepeat(len(tokens), again.reused_blocks // block_tokens,
                                            block_tokens, again.ttft_s))
    return calibrate(cold, repeats)


def probe_calibration(url: str, block_tokens: int, vocab_size: int) -> Calibration:
    """The costs of the Pantry at `url`, measured one request at a time (so with no queue):
    cold prompts of a few lengths, each followed by its repeat (its full blocks cached)."""
    return asyncio.run(_probe(url.rstrip("/"), block_tokens, vocab_size))


async def _replay(trace: Sequence[TraceRequest], options: ReplayOptions,
                  progress: Callable[[int], None] | None) -> list[RequestOutcome]:
    url = options.url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        model = await _model_id(http, url)
        t0 = trace[0].timestamp_ms
        began = time.monotonic()

        async def at_its_time(req: TraceRequest) -> RequestOutcome:
            due = (req.timestamp_ms - t0) / 1000.0 * options.time_scale
            await asyncio.sleep(max(began + due - time.monotonic(), 0.0))
            out = await _one(http, url, model,
                             trace_tokens(req, options.length_scale, options.vocab_size),
                             max(round(req.output_length * options.length_scale), 1))
            if progress is not None:
                progress(1)
            return out

        return list(await asyncio.gather(*(at_its_time(r) for r in trace)))


def replay_live(trace: Sequence[TraceRequest], options: ReplayOptions, slo: Slo,
                progress: Callable[[int], None] | None = None) -> PolicyResult:
    """One result named 'live'; its hit rate counts tokens served from the pool."""
    outcomes = asyncio.run(_replay(trace, options, progress))
    duration = (trace[-1].timestamp_ms - trace[0].timestamp_ms) / 1000.0 * options.time_scale
    return PolicyResult("live", tuple(outcomes), duration, slo)
