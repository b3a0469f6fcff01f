"""pantry.v1.Generation at the edge: proto -> GenerationRequest with values as sent, domain
events -> proto, and out-of-range requests refused by the conductor as INVALID_ARGUMENT with a
"field: message" detail, over a real gRPC server."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from conductor.grpc_api import (
    GenerationServicer,
    MalformedRequest,
    add_to_server,
    event_to_proto,
    parse_request,
    request_from_proto,
)
from conductor.requests import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    PromptAccepted,
    Sampling,
    TokensGenerated,
    Usage,
)
from pantry.common.errors import InvalidRequest
from pantry.v1 import common_pb2, generation_pb2
from tests.conductor.offline import CONTEXT, MODEL, VOCAB, offline_conductor

GOOD = [5, 6, 7]


def ids(*tokens: int) -> generation_pb2.TokenIds:
    return generation_pb2.TokenIds(ids=list(tokens))


# ---- request_from_proto ------------------------------------------------------------------------

def test_text_prompt_with_every_sampling_field() -> None:
    msg = generation_pb2.GenerateRequest(
        model="m", text="hello", tenant="t", request_id="req-1",
        sampling=common_pb2.SamplingParams(
            temperature=0.5, top_k=40, top_p=0.25, seed=7, max_tokens=12, stop=["x", "yz"],
            ignore_eos=True, stop_token_ids=[2, 3]))
    assert request_from_proto(msg) == GenerationRequest(
        request_id="req-1", model="m", text="hello",
        sampling=Sampling(temperature=0.5, top_k=40, top_p=0.25, seed=7, max_tokens=12,
                          stop=("x", "yz"), ignore_eos=True, stop_token_ids=(2, 3)),
        tenant="t", prompt_field="text")


def test_token_id_prompt_with_unset_sampling_gets_the_defaults() -> None:
    req = request_from_proto(generation_pb2.GenerateRequest(token_ids=ids(*GOOD)))
    assert req == GenerationRequest(
        request_id=req.request_id, token_ids=(5, 6, 7),
        sampling=Sampling(temperature=0.0, top_k=0, top_p=1.0, seed=None, max_tokens=None),
        prompt_field="token_ids")
    assert req.request_id.startswith("gen-")
    assert len(req.request_id) == len("gen-") + 32


def test_chat_prompt() -> None:
    msg = generation_pb2.GenerateRequest(chat=generation_pb2.ChatMessages(messages=[
        generation_pb2.ChatMessage(role="system", content="be brief"),
        generation_pb2.ChatMessage(role="user", content="hi"),
    ]))
    req = request_from_proto(msg)
    assert (req.messages, req.text, req.token_ids, req.prompt_field) == (
        (ChatMessage("system", "be brief"), ChatMessage("user", "hi")), None, None, "chat")


def test_seed_zero_is_a_seed() -> None:
    msg = generation_pb2.GenerateRequest(text="x", sampling=common_pb2.SamplingParams(seed=0))
    assert request_from_proto(msg).sampling.seed == 0


def test_out_of_range_values_are_carried_as_sent_for_the_conductor_to_refuse() -> None:
    msg = generation_pb2.GenerateRequest(token_ids=ids(*GOOD), sampling=common_pb2.SamplingParams(
        temperature=-1, top_k=-3, top_p=-0.5, max_tokens=-1))
    assert request_from_proto(msg).sampling == Sampling(
        temperature=-1.0, top_k=-3, top_p=-0.5, max_tokens=-1)


def test_missing_prompt_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        request_from_proto(generation_pb2.GenerateRequest(model="m"))
    assert str(info.value) == "prompt: is required: set text, token_ids or chat"


def test_parse_request() -> None:
    msg = generation_pb2.GenerateRequest(text="x", request_id="r")
    assert parse_request(msg.SerializeToString()) == msg
    bad = parse_request(b"\xff\xff\xff\xff\x0f")
    assert isinstance(bad, MalformedRequest)
    assert bad.reason == (
        "Error parsing message with type 'pantry.v1.GenerateRequest': Wire format was corrupt")


# ---- event_to_proto ----------------------------------------------------------------------------

def test_events_to_proto() -> None:
    assert event_to_proto("r", PromptAccepted((1, 2, 3))) == generation_pb2.GenerateResponse(
        request_id="r", prompt_token_ids=[1, 2, 3])
    assert event_to_proto("r", TokensGenerated((4, 5), "ab")) == generation_pb2.GenerateResponse(
        request_id="r", token_ids=[4, 5], text="ab")
    usage = Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1, ttft_s=0.25,
                  prefill_skipped=True)
    assert event_to_proto("r", GenerationFinished("length", "c", usage)) == (
        generation_pb2.GenerateResponse(
            request_id="r", text="c", finish_reason="length",
            usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1,
                                       ttft_ms=250.0, prefill_skipped=True)))


# ---- over a real server: INVALID_ARGUMENT with "field: message" --------------------------------

async def _generate(payload: generation_pb2.GenerateRequest | bytes
                    ) -> tuple[grpc.StatusCode, str]:
    conductor = offline_conductor()
    server = grpc.aio.server()
    add_to_server(GenerationServicer(conductor), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(
                "/pantry.v1.Generation/Generate",
                request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                response_deserializer=generation_pb2.GenerateResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call(payload, timeout=10):
                    pass
        return info.value.code(), info.value.details() or ""
    finally:
        await server.stop(grace=None)
        await conductor.close()


def sampled(**fields: float) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(token_ids=ids(*GOOD),
                                          sampling=common_pb2.SamplingParams(**fields))


@pytest.mark.parametrize(("payload", "detail"), [
    (generation_pb2.GenerateRequest(), "prompt: is required: set text, token_ids or chat"),
    (generation_pb2.GenerateRequest(token_ids=ids()),
     "token_ids: is empty; send at least one token"),
    (generation_pb2.GenerateRequest(token_ids=ids(1, VOCAB)),
     "token_ids: token id 100 is outside the vocabulary [0, 100)"),
    (generation_pb2.GenerateRequest(token_ids=ids(*range(CONTEXT))),
     "token_ids: 64 tokens do not fit the model's context of 64 tokens; shorten the prompt"),
    (generation_pb2.GenerateRequest(text="hi"),
     "text: this model has no tokenizer; send the prompt as token ids"),
    (generation_pb2.GenerateRequest(model="other", token_ids=ids(*GOOD)),
     f"model: 'other' is not served here; use '{MODEL}' (/v1/models)"),
    (sampled(max_tokens=-1), "max_tokens: must be at least 1, got -1"),
    (sampled(max_tokens=4096), "max_tokens: 4096 is too large: the 3-token prompt leaves room "
                               "for 61 tokens in the context of 64"),
    (sampled(temperature=-1), "temperature: must be >= 0, got -1.0"),
    (sampled(temperature=math.inf), "temperature: must be >= 0, got inf"),
    (sampled(top_p=-0.5), "top_p: must be in (0, 1], got -0.5"),
    (sampled(top_p=1.5), "top_p: must be in (0, 1], got 1.5"),
    (sampled(top_k=-3), "top_k: must be >= 0 (0 = off), got -3"),
    (b"\xff\xff\xff\xff\x0f",
     "request: not a GenerateRequest: Error parsing message with type "
     "'pantry.v1.GenerateRequest': Wire format was corrupt"),
])
def test_invalid_argument_names_the_field(payload: generation_pb2.GenerateRequest | bytes,
                                          detail: str) -> None:
    assert asyncio.run(_generate(payload)) == (grpc.StatusCode.INVALID_ARGUMENT, detail)
