"""Many engines: a failed engine leaves the rotation at once and a request that has streamed
nothing from it goes to another; engines are polled all at once; early rejection on the TBT
SLO; 429 with Retry-After over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conductor import fleet as fleet_module
from conductor.conductor import SloMiss
from conductor.http_api import create_app
from conductor.requests import GenerationFinished, PromptAccepted, TokensGenerated
from pantry.common.engine_info import EngineLoad
from pantry.common.errors import Overloaded, Unavailable
from tests.conductor.fakes import (
    DecodeCall,
    FakePrefill,
    Rig,
    chunk,
    fake_decode,
    fake_prefill,
    prompt,
    request,
)


def test_a_failed_prefill_is_retried_on_another_and_leaves_the_rotation(
    pool_address: str,
) -> None:
    p0 = fake_prefill("p0", error=Unavailable("engine fake-p0:0: UNAVAILABLE: gone"))
    p1 = fake_prefill("p1", first_token=9)
    decode = fake_decode("d0", chunk(9, 12, finish="length"))
    with Rig(pool_address, [p0, p1], [decode]) as rig:
        req = request(prompt(40), max_tokens=2)
        events = rig.generate(req)
        assert (len(p0.calls), len(p1.calls)) == (1, 1)  # equal engines: p0 first, then p1
        assert [c.first_token for c in decode.calls] == [9]
        assert events[1:3] == [TokensGenerated((9,), ""), TokensGenerated((12,), "")]
        assert [st.up for st in rig.prefill_states] == [False, True]
        assert rig.sample("pantry_conductor_requests_total",
                          route="prefill_then_decode", finish="length") == 1
        # The next request goes straight to p1.
        rig.generate(request(prompt(40, start=5), max_tokens=2))
        assert (len(p0.calls), len(p1.calls)) == (1, 2)


def test_a_decode_that_fails_before_streaming_is_retried_on_another(pool_address: str) -> None:
    d0 = fake_decode("d0", error=Unavailable("engine fake-d0:0: UNAVAILABLE: gone"))
    d1 = fake_decode("d1", chunk(7, 11), chunk(12, finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [d0, d1]) as rig:
        req = request(prompt(40), max_tokens=3)
        events = rig.generate(req)
        sampling = d0.calls[0].sampling
        # Both got the prefill's first token: the client's stream goes on where it was.
        assert d0.calls == [DecodeCall(req.request_id, prompt(40), "", sampling, 7)]
        assert d1.calls == [DecodeCall(req.request_id, prompt(40), "", sampling, 7)]
        assert events[0] == PromptAccepted(prompt(40))
        assert events[1:4] == [TokensGenerated((7,), ""), TokensGenerated((11,), ""),
                               TokensGenerated((12,), "")]
        assert isinstance(events[4], GenerationFinished)
        assert events[4].finish_reason == "length"
        assert [st.up for st in rig.decode_states] == [False, True]
        assert [st.inflight_requests for st in rig.decode_states] == [0, 0]


def test_the_only_decode_failing_before_streaming_surfaces_its_error(pool_address: str) -> None:
    d0 = fake_decode("d0", error=Unavailable("engine fake-d0:0: UNAVAILABLE: gone"))
    with Rig(pool_address, [fake_prefill("p0")], [d0]) as rig:
        rig.cache(prompt(32))
        with pytest.raises(Unavailable, match="^engine fake-d0:0: UNAVAILABLE: gone$"):
            rig.generate(request(prompt(32)))
        assert len(d0.calls) == 1


def test_predicted_tbt_miss_is_refused_before_any_engine_is_called(pool_address: str) -> None:
    """The untrained step model predicts 20 ms + 1 ms per sequence: 21 ms for a batch of one."""
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode], tbt_slo_s=0.02) as rig:
        with pytest.raises(SloMiss) as info:
            rig.generate(request(prompt(40)))
        assert isinstance(info.value, Overloaded)
        assert str(info.value) == "predicted TBT 21.0ms exceeds the SLO 20.0ms; retry later"
        assert (pre.calls, decode.calls) == ([], [])
        assert rig.sample("pantry_conductor_request_errors_total", kind="slo") == 1
    with Rig(pool_address, [pre], [decode], tbt_slo_s=0.025) as rig:
        assert isinstance(rig.generate(request(prompt(40)))[-1], GenerationFinished)


@pytest.mark.parametrize("stream", [False, True])
def test_http_slo_refusal_is_429_with_retry_after(pool_address: str, stream: bool) -> None:
    """40 tokens at 0.1 s per token predict 4 s against a 1 s SLO: come back in 3 s."""
    pre = fake_prefill("p0")
    with Rig(pool_address, [pre], [fake_decode("d0")], ttft_slo_s=1.0) as rig:
        rig.prefill_states[0].prefill_model.per_token_s = 0.1

        async def post() -> tuple[int, str | None, dict[str, Any]]:
            runner = web.AppRunner(create_app(rig.conductor))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            body = {"model": "fake-model", "prompt": list(prompt(40)), "max_tokens": 2,
                    "stream": stream}
            try:
                async with aiohttp.ClientSession() as http, http.post(
                        f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                    return resp.status, resp.headers.get("Retry-After"), await resp.json()
            finally:
                await runner.cleanup()

        status, retry_after, body = rig.run(post())
        assert (status, retry_after) == (429, "3")
        assert body["error"]["message"] == ("predicted TTFT 4.00s exceeds the SLO 1.00s; "
                                            "retry later")
        assert pre.calls == []


class _HungPrefill(FakePrefill):
    async def load(self, timeout: float = 2.0) -> EngineLoad:
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")


def test_a_hung_engine_is_down_after_one_poll_and_does_not_hide_the_others(
    pool_address: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet_module, "LOAD_TIMEOUT_S", 0.05)
    hung = _HungPrefill(fake_prefill("p0").description)
    with Rig(pool_address, [hung, fake_prefill("p1")], [fake_decode("d0")]) as rig:
        up = rig.run(rig.conductor.fleet.refresh())
        assert up == {"prefill:p0": False, "prefill:p1": True, "decode:d0": True,
                      "kvstore": True}
