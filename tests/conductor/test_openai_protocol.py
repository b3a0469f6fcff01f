"""OpenAI request bodies -> GenerationRequest; every refusal names the exact field and says what
to send instead. Value ranges are left to the conductor: the HTTP tests at the end show them
refused through Conductor.admit, by a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from conductor.http_api import create_app
from conductor.openai_protocol import (
    ParsedRequest,
    param_of,
    parse_chat,
    parse_completion,
)
from conductor.requests import MAX_STOP_STRINGS, ChatMessage, GenerationRequest, Sampling
from pantry.common.errors import InvalidRequest
from tests.conductor.offline import CONTEXT, VOCAB, offline_conductor

MSGS = [{"role": "user", "content": "hi"}]


def refusal(parse: Any, body: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    return info.value.field, info.value.message


# ---- /v1/completions: the prompt ---------------------------------------------------------------

def test_string_prompt() -> None:
    parsed = parse_completion({"model": "m", "prompt": "Hello there", "user": "alice"})
    req = parsed.generation
    assert req == GenerationRequest(
        request_id=req.request_id, model="m", text="Hello there", tenant="alice",
        prompt_field="prompt", default_max_tokens=16,
    )
    assert req.request_id.startswith("cmpl-")
    assert len(req.request_id) == len("cmpl-") + 32
    assert parsed == ParsedRequest(req, stream=False, include_usage=False,
                                   return_token_ids=False)


def test_request_ids_are_unique() -> None:
    a = parse_completion({"prompt": "x"}).generation
    b = parse_completion({"prompt": "x"}).generation
    assert a.request_id != b.request_id


@pytest.mark.parametrize(("prompt", "text", "ids"), [
    ([5, 6, 7], None, (5, 6, 7)),
    ([[9, 8, 7, 6]], None, (9, 8, 7, 6)),
    (["just one"], "just one", None),
    ("abc", "abc", None),
    # Emptiness and the vocabulary are check_prompt's to refuse, in the conductor.
    ([], None, ()),
    ([[]], None, ()),
    ([-3, 512], None, (-3, 512)),
])
def test_prompt_shapes(prompt: Any, text: str | None, ids: tuple[int, ...] | None) -> None:
    req = parse_completion({"prompt": prompt}).generation
    assert (req.text, req.token_ids, req.messages) == (text, ids, None)


# ---- refusals: exact param and message ---------------------------------------------------------

@pytest.mark.parametrize(("body", "param", "message"), [
    ({}, "prompt", "is required"),
    ({"prompt": None}, "prompt", "must be a string or a list of token ids"),
    ({"prompt": 5}, "prompt", "must be a string or a list of token ids"),
    ({"prompt": {"text": "x"}}, "prompt", "must be a string or a list of token ids"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": [""]}, "prompt[0]", "must not be empty"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt", "batches are not supported; send one prompt"),
    ({"prompt": ["a", "b"]}, "prompt", "batches are not supported; send one prompt"),
    ({"prompt": [1, "2"]}, "prompt[1]", 'must be an integer, got "2"'),
    ({"prompt": [1, 2.0]}, "prompt[1]", "must be an integer, got 2.0"),
    ({"prompt": [True, 3]}, "prompt[0]", "must be an integer, got true"),
    ({"prompt": [[1, None]]}, "prompt[0][1]", "must be an integer, got null"),
    ({"prompt": [1, [2]]}, "prompt[1]", "must be an integer, got a list"),
    ({"prompt": ["a", [2]]}, "prompt[1]", "must be a string, got a list"),
    ({"echo": True}, "echo", "is not supported; leave it out or send false"),
    ({"model": 3}, "model", "must be a string, got 3"),
    ({"n": 2}, "n", "only n=1 is supported; send one request per completion, got 2"),
    ({"n": 0}, "n", "only n=1 is supported; send one request per completion, got 0"),
    ({"n": "1"}, "n", 'must be an integer, got "1"'),
    ({"n": 1.0}, "n", "must be an integer, got 1.0"),
    ({"max_tokens": "x"}, "max_tokens", 'must be an integer, got "x"'),
    ({"max_tokens": 2.5}, "max_tokens", "must be an integer, got 2.5"),
    ({"max_tokens": True}, "max_tokens", "must be an integer, got true"),
    ({"stop": 5}, "stop", "must be a string or a list of strings"),
    ({"stop": {"a": 1}}, "stop", "must be a string or a list of strings"),
    ({"stop": ["a", 1]}, "stop[1]", "must be a string, got 1"),
    ({"stop": [None]}, "stop[0]", "must be a string, got null"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", "must have at most 16 items, got 17"),
    ({"seed": "7"}, "seed", 'must be an integer, got "7"'),
    ({"seed": 1.5}, "seed", "must be an integer, got 1.5"),
    ({"temperature": "hot"}, "temperature", 'must be a number, got "hot"'),
    ({"temperature": True}, "temperature", "must be a number, got true"),
    ({"temperature": "x" * 50}, "temperature", "must be a number, got a string of 50 characters"),
    ({"top_p": "1"}, "top_p", 'must be a number, got "1"'),
    ({"top_k": 1.5}, "top_k", "must be an integer, got 1.5"),
    ({"ignore_eos": "yes"}, "ignore_eos", 'must be true or false, got "yes"'),
    ({"stop_token_ids": 5}, "stop_token_ids", "must be a list, got 5"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids[1]", 'must be an integer, got "2"'),
    ({"user": 5}, "user", "must be a string, got 5"),
    ({"stream": "yes"}, "stream", 'must be true or false, got "yes"'),
    ({"stream": 1}, "stream", "must be true or false, got 1"),
    ({"stream_options": 3}, "stream_options",
     'must be an object like {"include_usage": true}, got 3'),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "must be true or false, got 1"),
    ({"return_token_ids": "yes"}, "return_token_ids", 'must be true or false, got "yes"'),
])
def test_completion_refusals(body: dict[str, Any], param: str, message: str) -> None:
    full = {"prompt": "x", **body} if "prompt" not in body and body else body
    assert refusal(parse_completion, full) == (param, message)


def test_unknown_fields_are_ignored() -> None:
    req = parse_completion({"prompt": "x", "logprobs": 3, "presence_penalty": 0.5,
                            "suffix": None, "frequency_penalty": "anything"}).generation
    assert (req.text, req.sampling) == ("x", Sampling())


def test_null_means_the_default() -> None:
    body = {key: None for key in (
        "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
        "stop_token_ids", "ignore_eos", "n", "stream", "stream_options", "user",
        "return_token_ids", "echo")}
    parsed = parse_completion({"prompt": "x", **body})
    assert parsed.generation.sampling == Sampling()
    assert (parsed.generation.model, parsed.generation.tenant) == ("", "")
    assert (parsed.stream, parsed.include_usage, parsed.return_token_ids) == (False, False, False)


# ---- sampling fields ---------------------------------------------------------------------------

def test_sampling_fields_are_carried_over() -> None:
    req = parse_completion({
        "prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 40, "ignore_eos": True,
        "stop_token_ids": [2, 7], "max_tokens": 4, "seed": 2**64 - 1, "stop": ["a", "bc"],
    }).generation
    assert req.sampling == Sampling(temperature=0.0, top_k=40, top_p=0.5, seed=2**64 - 1,
                                    max_tokens=4, stop=("a", "bc"), ignore_eos=True,
                                    stop_token_ids=(2, 7))


def test_sampling_defaults() -> None:
    assert parse_completion({"prompt": "x"}).generation.sampling == Sampling(
        temperature=1.0, top_k=0, top_p=1.0, seed=None, max_tokens=None, stop=(),
        ignore_eos=False, stop_token_ids=())


def test_one_stop_string_and_the_most_stop_strings() -> None:
    assert parse_completion({"prompt": "x", "stop": "\n"}).generation.sampling.stop == ("\n",)
    most = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert parse_completion({"prompt": "x", "stop": most}).generation.sampling.stop == tuple(most)


def test_top_k_minus_one_means_off_other_negatives_go_to_the_conductor() -> None:
    assert parse_completion({"prompt": "x", "top_k": -1}).generation.sampling.top_k == 0
    assert parse_completion({"prompt": "x", "top_k": -5}).generation.sampling.top_k == -5


def test_value_ranges_are_not_checked_by_the_schema() -> None:
    body = {"prompt": "x", "temperature": -1, "top_p": 0, "max_tokens": 0,
            "stop_token_ids": [-1]}
    assert parse_completion(body).generation.sampling == Sampling(
        temperature=-1.0, top_p=0.0, max_tokens=0, stop_token_ids=(-1,))


def test_completion_ignores_max_completion_tokens() -> None:
    parsed = parse_completion({"prompt": "x", "max_completion_tokens": 3})
    assert (parsed.generation.sampling.max_tokens, parsed.generation.max_tokens_field) == (
        None, "max_tokens")


def test_stream_options_and_token_ids() -> None:
    parsed = parse_completion({"prompt": "x", "stream": True,
                               "stream_options": {"include_usage": True, "other": 1},
                               "return_token_ids": True})
    assert (parsed.stream, parsed.include_usage, parsed.return_token_ids) == (True, True, True)
    no_usage = parse_completion({"prompt": "x", "stream": True, "stream_options": {}})
    assert (no_usage.stream, no_usage.include_usage) == (True, False)


# ---- /v1/chat/completions ----------------------------------------------------------------------

def test_chat_messages_parsed() -> None:
    parsed = parse_chat({"model": "m", "user": "t", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
    ]})
    req = parsed.generation
    assert req == GenerationRequest(
        request_id=req.request_id, model="m",
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
        tenant="t", prompt_field="messages", default_max_tokens=None,
    )
    assert req.request_id.startswith("chatcmpl-")


def test_content_as_text_parts_is_joined() -> None:
    req = parse_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"},
    ]}]}).generation
    assert req.messages == (ChatMessage("user", "Hello, world"),)


def test_null_or_missing_content_is_empty_text() -> None:
    req = parse_chat({"messages": [{"role": "assistant", "content": None},
                                   {"role": "user"}]}).generation
    assert req.messages == (ChatMessage("assistant", ""), ChatMessage("user", ""))


def test_empty_messages_are_left_to_the_conductor() -> None:
    assert parse_chat({"messages": []}).generation.messages == ()


@pytest.mark.parametrize(("body", "param", "message"), [
    ({}, "messages", "is required"),
    ({"messages": "hi"}, "messages", 'must be a list, got "hi"'),
    ({"messages": None}, "messages", "must be a list, got null"),
    ({"messages": {"role": "user"}}, "messages", "must be a list, got an object"),
    ({"messages": [*MSGS, {"content": "x"}]}, "messages[1].role", "is required"),
    ({"messages": [*MSGS, {"role": 1}]}, "messages[1].role", "must be a string, got 1"),
    ({"messages": [*MSGS, "user: x"]}, "messages[1]",
     'must be an object like {"role": "user", "content": "..."}, got "user: x"'),
    ({"messages": [*MSGS, None]}, "messages[1]",
     'must be an object like {"role": "user", "content": "..."}, got null'),
    ({"messages": [*MSGS, {"role": "user", "content": 5}]}, "messages[1].content",
     "must be a string or a list of text parts"),
    ({"messages": [*MSGS, {"role": "user", "content": {"type": "text", "text": "a"}}]},
     "messages[1].content", "must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type", "must be 'text', got \"image_url\""),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]},
     "messages[0].content[1]", 'must be a text part like {"type": "text", "text": "..."}, got "b"'),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text", "is required"),
    ({"messages": MSGS, "model": ["m"]}, "model", "must be a string, got a list"),
    ({"messages": MSGS, "max_completion_tokens": "5"}, "max_completion_tokens",
     'must be an integer, got "5"'),
    ({"messages": MSGS, "n": 2}, "n", "only n=1 is supported; send one request per completion, "
                                      "got 2"),
    ({"messages": MSGS, "stop": 1}, "stop", "must be a string or a list of strings"),
])
def test_chat_refusals(body: dict[str, Any], param: str, message: str) -> None:
    assert refusal(parse_chat, body) == (param, message)


def test_chat_prefers_max_completion_tokens_over_max_tokens() -> None:
    both = parse_chat({"messages": MSGS, "max_completion_tokens": 5, "max_tokens": 9})
    assert (both.generation.sampling.max_tokens, both.generation.max_tokens_field) == (
        5, "max_completion_tokens")
    legacy = parse_chat({"messages": MSGS, "max_tokens": 9})
    assert (legacy.generation.sampling.max_tokens, legacy.generation.max_tokens_field) == (
        9, "max_tokens")
    null_new = parse_chat({"messages": MSGS, "max_completion_tokens": None, "max_tokens": 3})
    assert (null_new.generation.sampling.max_tokens, null_new.generation.max_tokens_field) == (
        3, "max_tokens")


def test_completions_default_to_openais_16_tokens_chat_to_the_servers() -> None:
    assert parse_completion({"prompt": "hi"}).generation.default_max_tokens == 16
    assert parse_chat({"messages": MSGS}).generation.default_max_tokens is None


@pytest.mark.parametrize(("loc", "param"), [
    ((), "body"),
    (("messages", 2, "content"), "messages[2].content"),
    (("messages", 0, "content", "<list>", 1, "type"), "messages[0].content[1].type"),
    (("prompt", "<token id lists>", 0, 3), "prompt[0][3]"),
    (("stream_options", "include_usage"), "stream_options.include_usage"),
])
def test_param_of_pydantic_locations(loc: tuple[str | int, ...], param: str) -> None:
    assert param_of(loc) == param


# ---- through a real HTTP server: ranges are the conductor's ------------------------------------

@pytest.mark.parametrize(("field", "asked", "message"), [
    ("max_completion_tokens", 0, "must be at least 1, got 0"),
    ("max_tokens", 0, "must be at least 1, got 0"),
    ("max_completion_tokens", CONTEXT,
     "64 is too large: the 3-token prompt leaves room for 61 tokens in the context of 64"),
])
def test_the_limit_is_refused_under_the_name_the_caller_sent(field: str, asked: int,
                                                              message: str) -> None:
    async def run() -> InvalidRequest:
        conductor = offline_conductor()
        req = GenerationRequest(request_id="r", token_ids=tuple(GOOD),
                                sampling=Sampling(max_tokens=asked), max_tokens_field=field)
        with pytest.raises(InvalidRequest) as info:
            conductor.admit(req)
        await conductor.close()
        return info.value
    refused = asyncio.run(run())
    assert (refused.field, refused.message) == (field, message)


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    conductor = offline_conductor()
    runner = web.AppRunner(create_app(conductor), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await conductor.close()


def post(path: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    async def run() -> tuple[int, Any]:
        async with http_server() as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            if isinstance(body, bytes):
                resp = await client.post(path, content=body)
            else:
                resp = await client.post(path, json=body)
            return resp.status_code, resp.json()
    return asyncio.run(run())


def bad_request(param: str, message: str) -> tuple[int, Any]:
    return 400, {"error": {"message": f"{param}: {message}", "type": "invalid_request_error",
                           "param": param, "code": 400}}


GOOD = [5, 6, 7]
HTTP_CASES: list[tuple[str, dict[str, Any] | bytes, tuple[int, Any]]] = [
    # Ranges: SamplingParams and check_prompt, in Conductor.admit.
    ("/v1/completions", {"prompt": GOOD, "temperature": -1},
     bad_request("temperature", "must be >= 0, got -1.0")),
    ("/v1/completions", {"prompt": GOOD, "top_p": 0},
     bad_request("top_p", "must be in (0, 1], got 0.0")),
    ("/v1/completions", {"prompt": GOOD, "top_p": 1.5},
     bad_request("top_p", "must be in (0, 1], got 1.5")),
    ("/v1/completions", {"prompt": GOOD, "top_k": -5},
     bad_request("top_k", "must be >= 0 (0 = off), got -5")),
    ("/v1/completions", {"prompt": GOOD, "max_tokens": 0},
     bad_request("max_tokens", "must be at least 1, got 0")),
    ("/v1/completions", {"prompt": GOOD, "max_tokens": -5},
     bad_request("max_tokens", "must be at least 1, got -5")),
    ("/v1/completions", {"prompt": GOOD, "max_tokens": CONTEXT},
     bad_request("max_tokens", "64 is too large: the 3-token prompt leaves room for 61 tokens "
                               "in the context of 64")),
    ("/v1/completions", {"prompt": GOOD, "seed": -1},
     bad_request("seed", "must be between 0 and 2**64 - 1, got -1")),
    ("/v1/completions", {"prompt": GOOD, "seed": 2**64},
     bad_request("seed", "must be between 0 and 2**64 - 1, got 18446744073709551616")),
    ("/v1/completions", {"prompt": GOOD, "stop_token_ids": [3, -1]},
     bad_request("stop_token_ids", "must be non-negative integers, got [3, -1]")),
    ("/v1/completions", {"prompt": []}, bad_request("prompt", "is empty; send at least one token")),
    ("/v1/completions", {"prompt": [1, VOCAB]},
     bad_request("prompt", "token id 100 is outside the vocabulary [0, 100)")),
    ("/v1/completions", {"prompt": list(range(CONTEXT))},
     bad_request("prompt", "64 tokens do not fit the model's context of 64 tokens; "
                           "shorten the prompt")),
    ("/v1/completions", {"prompt": "hello"},
     bad_request("prompt", "this model has no tokenizer; send the prompt as token ids")),
    ("/v1/completions", {"prompt": GOOD, "model": "gpt-4"},
     bad_request("model", "'gpt-4' is not served here; use 'tiny' (/v1/models)")),
    # Types and shapes: the schema.
    ("/v1/completions", {"prompt": GOOD, "stop": ["a", 7]},
     bad_request("stop[1]", "must be a string, got 7")),
    ("/v1/completions", {"prompt": GOOD, "stream_options": {"include_usage": "yes"}},
     bad_request("stream_options.include_usage", 'must be true or false, got "yes"')),
    ("/v1/chat/completions", {"messages": [*MSGS, {"role": "user", "content": 3}]},
     bad_request("messages[1].content", "must be a string or a list of text parts")),
    ("/v1/completions", b"[1, 2]", bad_request("body", "must be a JSON object")),
    ("/v1/completions", b"{not json",
     bad_request("body", "is not valid JSON: Expecting property name enclosed in double "
                         "quotes: line 1 column 2 (char 1)")),
]


@pytest.mark.parametrize(("path", "body", "answer"), HTTP_CASES)
def test_http_refusals_are_400_naming_the_field(path: str, body: dict[str, Any] | bytes,
                                                answer: tuple[int, Any]) -> None:
    assert post(path, body) == answer
