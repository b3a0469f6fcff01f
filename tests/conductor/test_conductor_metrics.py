"""The conductor's counters after a known mix of requests, and /metrics over real HTTP."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from conductor.http_api import create_app
from pantry.common.errors import InvalidRequest, Unavailable
from tests.conductor.fakes import BLOCK, Rig, chunk, fake_decode, fake_prefill, prompt, request


def _serve_mix(rig: Rig) -> None:
    """Three routes, two refusals: what the counters below must add up to."""
    pre, dec = rig.prefills[0], rig.decodes[0]
    # prefill_then_decode: 40 prompt tokens, one block from the pool, 4 tokens in 4 chunks
    rig.cache(prompt(40), blocks=1)
    pre.pool_tokens = BLOCK
    dec.chunks = (chunk(7, 8), chunk(9), chunk(10, finish="length"))
    rig.generate(request(prompt(40)))
    # decode_direct: 32 prompt tokens all in the pool, 2 tokens, the engine saw eos
    rig.cache(prompt(32, start=20))
    dec.chunks = (chunk(11, pool_tokens=32), chunk(12, finish="stop"))
    rig.generate(request(prompt(32, start=20)))
    # decode_fallback: prefill is gone, decode computes all 40, 2 tokens
    pre.error = Unavailable("engine fake-p0:0: UNAVAILABLE")
    dec.chunks = (chunk(13, computed=40), chunk(14, finish="length"))
    rig.generate(request(prompt(40, start=9)))
    # refused: invalid, then no decode engine up
    with pytest.raises(InvalidRequest):
        rig.generate(request(()))
    rig.decode_states[0].up = False
    with pytest.raises(Unavailable):
        rig.generate(request(prompt(40)))


EXPECTED = {
    ("pantry_conductor_requests_total", (("finish", "length"), ("route", "prefill_then_decode"))):
        1,
    ("pantry_conductor_requests_total", (("finish", "stop"), ("route", "decode_direct"))): 1,
    ("pantry_conductor_requests_total", (("finish", "length"), ("route", "decode_fallback"))): 1,
    ("pantry_conductor_prompt_tokens_total", ()): 40 + 32 + 40,
    ("pantry_conductor_cached_tokens_total", ()): BLOCK + 32 + 0,
    ("pantry_conductor_generated_tokens_total", ()): 4 + 2 + 2,
    ("pantry_conductor_request_errors_total", (("kind", "invalid"),)): 1,
    ("pantry_conductor_request_errors_total", (("kind", "unavailable"),)): 1,
    ("pantry_conductor_request_errors_total", (("kind", "overloaded"),)): 0,
    ("pantry_conductor_request_errors_total", (("kind", "slo"),)): 0,
    ("pantry_conductor_time_to_first_token_seconds_count",
     (("route", "prefill_then_decode"),)): 1,
    ("pantry_conductor_time_to_first_token_seconds_count", (("route", "decode_direct"),)): 1,
    ("pantry_conductor_time_to_first_token_seconds_count", (("route", "decode_fallback"),)): 1,
    # gaps between streamed chunks: 3 + 1 + 1
    ("pantry_conductor_time_between_tokens_seconds_count", ()): 5,
    ("pantry_conductor_inflight_requests", ()): 0,
}


def test_counters_after_a_mix_of_requests(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")]) as rig:
        _serve_mix(rig)
        got = {key: rig.sample(key[0], **dict(key[1])) for key in EXPECTED}
        assert got == EXPECTED
        # every request that got a first token fell in a bucket at or below 10 s
        assert rig.sample("pantry_conductor_time_to_first_token_seconds_bucket",
                          route="decode_direct", le="10.0") == 1


def test_http_metrics_serves_the_registry_in_prometheus_text(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")]) as rig:
        _serve_mix(rig)

        async def scrape() -> tuple[str, str]:
            runner = web.AppRunner(create_app(rig.conductor))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                async with aiohttp.ClientSession() as http, \
                        http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200
                    return resp.headers["Content-Type"], await resp.text()
            finally:
                await runner.cleanup()

        content_type, text = rig.run(scrape())
        assert content_type == CONTENT_TYPE_LATEST
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert {key: samples[key] for key in EXPECTED} == EXPECTED
        assert samples[("pantry_conductor_role_up",
                        (("engine", "kvstore"), ("role", "kvstore")))] == 1
