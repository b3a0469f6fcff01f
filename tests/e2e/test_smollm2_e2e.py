"""The embedded default model through a whole running Pantry, against transformers loading the
same GGUF file: chat template, prompt ids and greedy tokens, cold and from the pool."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch

from tests.e2e.local_system import LocalSystem
from tests.helpers.tiny_models import smollm2_gguf_path

NEW_TOKENS = 16
LONG_CONTEXT = " ".join(
    f"Shelf {i} of the pantry holds jars of {kind} labelled in batch {i * 7 % 13}."
    for i, kind in enumerate(["flour", "rice", "lentils", "oats", "sugar", "salt", "beans",
                              "pasta", "honey", "tea", "coffee", "spices"] * 2)
)


@cache
def _hf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def hf_chat(messages: list[dict[str, str]], n: int) -> tuple[list[int], list[int]]:
    tok, model = _hf()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        # Both sides stop at EOS (min_new_tokens would instead forbid EOS, which ignore_eos
        # does not): the comparison includes where each one stops.
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n)
    return ids, out[0, len(ids):].tolist()


def pool_tokens(prompt_len: int) -> int:
    """Prompt tokens a repeat serves from the pool: every full block, but never the last token
    (its logits give the next token, so it is always computed)."""
    return min(prompt_len // 16 * 16, prompt_len - 1)


def chat(system: LocalSystem, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
    resp = system.post("/v1/chat/completions", {
        "model": system.model, "messages": messages, "max_tokens": n, "temperature": 0,
        "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _conv(question: str, context: str = "") -> list[dict[str, str]]:
    sys = "You are a helpful kitchen assistant." + (f" Context: {context}" if context else "")
    return [{"role": "system", "content": sys}, {"role": "user", "content": question}]


@pytest.mark.parametrize("context", ["", LONG_CONTEXT], ids=["short", "many-blocks"])
def test_chat_miss_hit_match_transformers(smollm2_system: LocalSystem, context: str) -> None:
    messages = _conv("What should I cook tonight with what is on the shelves?", context)
    ids, expected = hf_chat(messages, NEW_TOKENS)
    assert len(ids) > 16
    cold = chat(smollm2_system, messages, NEW_TOKENS)
    choice = cold["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == expected
    assert choice["message"]["content"] == _hf()[0].decode(expected, skip_special_tokens=True)

    before = smollm2_system.prefill_load()
    hit = chat(smollm2_system, messages, NEW_TOKENS)
    after = smollm2_system.prefill_load()
    assert hit["choices"][0]["token_ids"] == expected
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == pool_tokens(len(ids))
    assert hit["usage"]["prefill_skipped"] is True
    assert after.computed_tokens_total == before.computed_tokens_total


def test_chat_partial_prefix(smollm2_system: LocalSystem) -> None:
    first = chat(smollm2_system, _conv("List three breakfasts.", LONG_CONTEXT), 4)
    messages = _conv("Which shelf has the honey?", LONG_CONTEXT)
    ids, expected = hf_chat(messages, NEW_TOKENS)
    got = chat(smollm2_system, messages, NEW_TOKENS)
    assert got["choices"][0]["token_ids"] == expected
    # Both prompts share the system prompt and context: exactly its full blocks come back.
    shared = next(i for i, (a, b) in enumerate(zip(first["choices"][0]["prompt_token_ids"], ids,
                                                   strict=False)) if a != b)
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == shared // 16 * 16
    assert shared // 16 * 16 > 16 * 10  # the context spans many blocks, so this is a real hit
    assert got["usage"]["prefill_skipped"] is False


def test_openai_client_streaming(smollm2_system: LocalSystem) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=smollm2_system.http + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [smollm2_system.model]
    messages: Any = _conv("Name a fruit.")
    whole = client.chat.completions.create(model=smollm2_system.model, messages=messages,
                                           max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=smollm2_system.model, messages=messages,
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt was just served: every full block of it comes from the pool.
    assert usage.prompt_tokens_details.cached_tokens == pool_tokens(usage.prompt_tokens)

    text = client.completions.create(model=smollm2_system.model, prompt="The capital of France is",
                                     max_tokens=5, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=smollm2_system.model, prompt="The capital of France is", max_tokens=5,
        temperature=0, stream=True))
    assert streamed == text.choices[0].text


def test_stop_string_cuts_text(smollm2_system: LocalSystem) -> None:
    messages = _conv("Count from one to ten in words, separated by commas.")
    full = chat(smollm2_system, messages, 24)["choices"][0]["message"]["content"]
    assert len(full) > 10
    stop = full[6:8]  # a stop string the greedy answer is known to contain
    resp = smollm2_system.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": 24, "temperature": 0, "stop": ["@@never", stop]})
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_health_and_metrics(smollm2_system: LocalSystem) -> None:
    import httpx

    health = httpx.get(smollm2_system.http + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["roles"] == {"prefill:prefill-0": True, "decode:decode-0": True,
                                      "kvstore": True}
    ttft = 'pantry_conductor_time_to_first_token_seconds_count{route="decode_direct"}'
    before = smollm2_system.metrics("conductor")
    assert before['pantry_conductor_role_up{engine="kvstore",role="kvstore"}'] == 1.0
    body = {"prompt": list(range(300, 340)), "max_tokens": 2, "temperature": 0}
    assert smollm2_system.post("/v1/completions", body).status_code == 200
    assert smollm2_system.post("/v1/completions", body).status_code == 200  # a full hit
    after = smollm2_system.metrics("conductor")
    assert after[ttft] == before.get(ttft, 0.0) + 1


@pytest.mark.parametrize("length", [5, 16, 17, 200])
def test_token_prompts_across_block_boundaries(smollm2_system: LocalSystem, length: int) -> None:
    import random

    rng = random.Random(length)
    ids = [rng.randrange(100, 40000) for _ in range(length)]
    _, model = _hf()
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=8)[0, length:].tolist()
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    for attempt in ("miss", "hit"):
        got = smollm2_system.post("/v1/completions", body).json()
        assert got["choices"][0]["token_ids"] == expected, attempt
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        min(length // 16 * 16, length - 1) if length >= 16 else 0)


def test_stop_string_in_first_token_ends_before_decode(smollm2_system: LocalSystem) -> None:
    messages = _conv("Say hello to the line cooks of the evening shift.")
    first = smollm2_system.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": 1, "temperature": 0, "user": "probe"}).json()
    head = first["choices"][0]["message"]["content"]
    assert head
    # A cold prompt: the first token comes from prefill, and it already contains the stop.
    got = smollm2_system.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": 8, "temperature": 0, "stop": [head[-1]]}).json()
    assert got["choices"][0]["finish_reason"] == "stop"
    assert got["choices"][0]["message"]["content"] == head[:-1]
    assert got["usage"]["completion_tokens"] == 1
    assert got["usage"]["prefill_skipped"] is False


def test_client_hanging_up_frees_the_sequence(smollm2_system: LocalSystem) -> None:
    import time

    import grpc
    import httpx

    from pantry.v1 import engine_pb2, engine_pb2_grpc

    body = {"messages": _conv("Tell me a very long story about the pantry."),
            "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", smollm2_system.http + "/v1/chat/completions", json=body,
                      timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # generating now; about 25 s of work is left when we hang up
    with grpc.insecure_channel(smollm2_system.role("decode")["address"]) as ch:
        stub = engine_pb2_grpc.DecodeEngineStub(ch)
        deadline = time.monotonic() + 10
        while True:
            load = stub.Load(engine_pb2.EngineLoadRequest(), timeout=5)
            if load.running == 0 and load.free_blocks == load.total_blocks:
                break
            assert time.monotonic() < deadline, f"sequence still held: {load}"
            time.sleep(0.1)
