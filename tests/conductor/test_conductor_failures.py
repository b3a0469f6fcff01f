"""How the conductor maps failures: a prefill engine down falls back to decode, no decode is
Unavailable, an engine's INVALID_ARGUMENT names the field, limits and the SLO are Overloaded."""

from __future__ import annotations

import grpc
import pytest

from conductor.conductor import SloMiss
from conductor.engines import error_from_rpc
from conductor.requests import GenerationFinished, PromptAccepted, TokensGenerated, Usage
from pantry.common.errors import InvalidRequest, Overloaded, Unavailable
from tests.conductor.fakes import (
    DecodeCall,
    Rig,
    chunk,
    fake_decode,
    fake_prefill,
    prompt,
    request,
    timeless,
)


def test_prefill_unavailable_falls_back_to_decode_with_the_same_tokens(
    pool_address: str,
) -> None:
    pre = fake_prefill("p0", error=Unavailable("engine fake-p0:0: UNAVAILABLE: gone"))
    decode = fake_decode("d0", chunk(11, computed=40), chunk(12, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        req = request(prompt(40), max_tokens=2)
        events = rig.generate(req)
        assert len(pre.calls) == 1
        # decode computes the whole prompt itself: no first token handed over
        assert decode.calls == [DecodeCall(req.request_id, prompt(40), "",
                                           pre.calls[0].sampling, None)]
        assert events[1:3] == [TokensGenerated((11,), ""), TokensGenerated((12,), "")]
        finished = events[3]
        assert isinstance(finished, GenerationFinished)
        assert timeless(finished.usage) == Usage(prompt_tokens=40, completion_tokens=2,
                                                 cached_tokens=0, ttft_s=0.0,
                                                 prefill_skipped=True)
        assert rig.prefill_states[0].up is False  # until the next poll says otherwise
        assert rig.prefill_states[0].inflight_tokens == 0
        assert rig.sample("pantry_conductor_requests_total",
                          route="decode_fallback", finish="length") == 1


def test_no_prefill_up_falls_back_without_calling_it(pool_address: str) -> None:
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(11, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        rig.prefill_states[0].up = False
        rig.generate(request(prompt(40), max_tokens=1))
        assert pre.calls == []
        assert [c.first_token for c in decode.calls] == [None]


def test_no_decode_up_is_unavailable(pool_address: str) -> None:
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        rig.decode_states[0].up = False
        with pytest.raises(Unavailable, match="^no decode engine is up$"):
            rig.generate(request(prompt(40)))
        assert decode.calls == []
        assert rig.sample("pantry_conductor_request_errors_total", kind="unavailable") == 1
        assert rig.sample("pantry_conductor_inflight_requests") == 0


def test_decode_stream_failure_surfaces_after_the_tokens_sent(pool_address: str) -> None:
    decode = fake_decode("d0", chunk(11), error=Unavailable("engine fake-d0:0: UNAVAILABLE"))
    with Rig(pool_address, [fake_prefill("p0")], [decode]) as rig:
        rig.cache(prompt(32))
        seen: list[object] = []

        async def consume() -> None:
            async for event in rig.conductor.generate(request(prompt(32))):
                seen.append(event)

        with pytest.raises(Unavailable, match="fake-d0"):
            rig.run(consume())
        assert seen == [PromptAccepted(prompt(32)), TokensGenerated((11,), "")]
        assert (decode.open_streams, decode.closed_streams) == (0, 1)
        assert rig.decode_states[0].inflight_requests == 0
        assert rig.sample("pantry_conductor_request_errors_total", kind="unavailable") == 1
        assert rig.sample("pantry_conductor_requests_total",
                          route="decode_direct", finish="cancelled") is None


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_engine_status_codes_become_named_failures() -> None:
    invalid = error_from_rpc(
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "first_token: 99 is outside the vocabulary"),
        "p:1")
    assert isinstance(invalid, InvalidRequest)
    assert (invalid.field, str(invalid)) == (
        "first_token", "first_token: 99 is outside the vocabulary")
    bare = error_from_rpc(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad"), "p:1")
    assert isinstance(bare, InvalidRequest) and bare.field == "request"
    full = error_from_rpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), "p:1")
    assert type(full) is Overloaded and str(full) == "queue full"
    gone = error_from_rpc(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connect failed"), "p:1")
    assert type(gone) is Unavailable
    assert str(gone) == "engine p:1: UNAVAILABLE: connect failed"


def test_engine_invalid_argument_reaches_the_caller_naming_the_field(pool_address: str) -> None:
    pre = fake_prefill("p0", error=InvalidRequest("top_k", "must be >= 0 (0 = off), got -1"))
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        with pytest.raises(InvalidRequest) as info:
            rig.generate(request(prompt(40)))
        assert (info.value.field, str(info.value)) == (
            "top_k", "top_k: must be >= 0 (0 = off), got -1")
        assert decode.calls == []
        assert rig.prefill_states[0].up is True  # the engine is fine: the request was not
        assert rig.sample("pantry_conductor_request_errors_total", kind="invalid") == 1


def test_over_max_concurrent_requests_is_overloaded(pool_address: str) -> None:
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [decode], max_concurrent_requests=1) as rig:
        conductor = rig.conductor

        async def two_at_once() -> None:
            first = conductor.generate(request(prompt(40)))
            assert await anext(first) == PromptAccepted(prompt(40))
            with pytest.raises(Overloaded, match=r"^1 requests in flight \(max_concurrent"):
                await anext(conductor.generate(request(prompt(40))))
            await first.aclose()

        rig.run(two_at_once())
        assert rig.sample("pantry_conductor_request_errors_total", kind="overloaded") == 1
        assert rig.sample("pantry_conductor_inflight_requests") == 0
        # the slot is free again
        assert isinstance(rig.generate(request(prompt(40)))[-1], GenerationFinished)


def test_predicted_slo_miss_is_overloaded_before_any_engine_is_called(
    pool_address: str,
) -> None:
    """40 uncached tokens at the initial 2 ms per token predict 0.08 s: over a 0.05 s SLO."""
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode], ttft_slo_s=0.05) as rig:
        with pytest.raises(SloMiss) as info:
            rig.generate(request(prompt(40)))
        assert isinstance(info.value, Overloaded)  # what the APIs map to 429
        assert str(info.value) == "predicted TTFT 0.08s exceeds the SLO 0.05s; retry later"
        assert (pre.calls, decode.calls) == ([], [])
        assert rig.sample("pantry_conductor_request_errors_total", kind="slo") == 1
        assert rig.sample("pantry_conductor_request_errors_total", kind="overloaded") == 0
