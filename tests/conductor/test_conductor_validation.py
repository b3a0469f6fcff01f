"""Requests refused before any engine is asked, each error naming the field to change."""

from __future__ import annotations

import dataclasses

import pytest

from conductor.requests import ChatMessage, GenerationRequest, PromptAccepted
from pantry.common.errors import InvalidRequest
from pantry.common.sampling import SamplingParams
from tests.conductor.fakes import (
    MAX_MODEL_LEN,
    VOCAB,
    Rig,
    char_tokenizer,
    chunk,
    fake_decode,
    fake_prefill,
    prompt,
    request,
)


def _refusal(rig: Rig, req: GenerationRequest) -> InvalidRequest:
    """The error the first event raises: nothing, not even PromptAccepted, is sent before it."""
    async def first() -> object:
        return await anext(rig.conductor.generate(req))

    with pytest.raises(InvalidRequest) as info:
        rig.run(first())
    return info.value


CASES = [
    (request(()), "prompt", "is empty; send at least one token"),
    (request((5, VOCAB, 6)), "prompt",
     f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    (request((5, -1)), "prompt", f"token id -1 is outside the vocabulary [0, {VOCAB})"),
    (request(prompt(MAX_MODEL_LEN)), "prompt",
     f"{MAX_MODEL_LEN} tokens do not fit the model's context of {MAX_MODEL_LEN} tokens; "
     "shorten the prompt"),
    (request(prompt(100), max_tokens=40), "max_tokens",
     f"40 is too large: the 100-token prompt leaves room for 28 tokens in the context of "
     f"{MAX_MODEL_LEN}"),
    (request(prompt(10), max_tokens=0), "max_tokens", "must be at least 1, got 0"),
    (request(prompt(10), temperature=-0.5), "temperature", "must be >= 0, got -0.5"),
    (request(prompt(10), top_p=0.0), "top_p", "must be in (0, 1], got 0.0"),
    (dataclasses.replace(request(prompt(10)), model="other-model"), "model",
     "'other-model' is not served here; use 'fake-model' (/v1/models)"),
    (request(text="hello"), "prompt",
     "this model has no tokenizer; send the prompt as token ids"),
]


@pytest.mark.parametrize(("req", "field", "message"), CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_refused_naming_the_field(pool_address: str, req: GenerationRequest, field: str,
                                  message: str) -> None:
    pre, decode = fake_prefill("p0"), fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        err = _refusal(rig, req)
        assert (err.field, str(err)) == (field, f"{field}: {message}")
        assert (pre.calls, decode.calls) == ([], [])
        assert rig.sample("pantry_conductor_request_errors_total", kind="invalid") == 1
        assert rig.sample("pantry_conductor_inflight_requests") == 0


def test_errors_use_the_apis_own_name_for_the_prompt(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")],
             tokenizer=char_tokenizer()) as rig:
        chat = dataclasses.replace(request(), messages=(), prompt_field="messages")
        err = _refusal(rig, chat)
        assert str(err) == "messages: is empty; send at least one message"
        ids = dataclasses.replace(request((5, 99)), prompt_field="token_ids")
        assert _refusal(rig, ids).field == "token_ids"
        no_template = dataclasses.replace(
            request(), messages=(ChatMessage("user", "hi"),), prompt_field="messages")
        err = _refusal(rig, no_template)
        assert str(err) == ("messages: chat template failed: "
                            "this model's tokenizer has no chat template")
        assert rig.sample("pantry_conductor_request_errors_total", kind="invalid") == 3


def test_no_max_tokens_takes_the_default_cut_to_the_context(pool_address: str) -> None:
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode], default_max_tokens=20) as rig:
        rig.generate(request(prompt(40), max_tokens=None))
        rig.generate(dataclasses.replace(request(prompt(40), max_tokens=None),
                                         default_max_tokens=30))  # the API's own default
        rig.generate(request(prompt(100), max_tokens=None))  # 28 tokens of room left
        assert [c.sampling for c in pre.calls] == [
            SamplingParams(temperature=0.0, max_tokens=20),
            SamplingParams(temperature=0.0, max_tokens=30),
            SamplingParams(temperature=0.0, max_tokens=20),
        ]
        rig.generate(dataclasses.replace(request(prompt(120), max_tokens=None),
                                         default_max_tokens=30))
        assert pre.calls[-1].sampling.max_tokens == 8


def test_a_valid_request_starts_with_prompt_accepted(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")],
             [fake_decode("d0", chunk(7, finish="length"))]) as rig:
        events = rig.generate(request(prompt(10), max_tokens=1))
        assert events[0] == PromptAccepted(prompt(10))
        assert rig.sample("pantry_conductor_request_errors_total", kind="invalid") == 0
