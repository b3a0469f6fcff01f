"""OpenAI request bodies -> GenerationRequest; every refusal names the exact field."""

from __future__ import annotations

from typing import Any

import pytest

from conductor.openai_protocol import MAX_STOP_STRINGS, parse_chat, parse_completion
from conductor.requests import ChatMessage
from pantry.common.errors import InvalidRequest


def refused_field(parse: Any, body: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    return info.value.field


# ---- /v1/completions: the prompt ---------------------------------------------------------------

def test_string_prompt() -> None:
    req = parse_completion({"model": "m", "prompt": "Hello there", "user": "alice"})
    assert req.text == "Hello there"
    assert req.token_ids is None
    assert req.messages is None
    assert req.model == "m"
    assert req.tenant == "alice"
    assert req.prompt_field == "prompt"
    assert req.request_id.startswith("cmpl-")
    assert req.sampling.max_tokens is None     # server default


def test_request_ids_are_unique() -> None:
    a = parse_completion({"prompt": "x"})
    b = parse_completion({"prompt": "x"})
    assert a.request_id != b.request_id


def test_token_id_list_prompt() -> None:
    req = parse_completion({"prompt": [5, 6, 7]})
    assert req.token_ids == (5, 6, 7)
    assert req.text is None


def test_nested_single_token_id_list_prompt() -> None:
    req = parse_completion({"prompt": [[9, 8, 7, 6]]})
    assert req.token_ids == (9, 8, 7, 6)
    assert req.text is None


def test_single_string_in_a_list_is_a_text_prompt() -> None:
    req = parse_completion({"prompt": ["just one"]})
    assert req.text == "just one"


@pytest.mark.parametrize("prompt", [[[1, 2], [3, 4]], ["a", "b"]])
def test_batch_of_two_prompts_is_refused_naming_prompt(prompt: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion({"prompt": prompt})
    assert info.value.field == "prompt"
    assert "batch" in info.value.message


@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt_is_refused(prompt: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion({"prompt": prompt})
    assert info.value.field == "prompt"
    assert "empty" in info.value.message


@pytest.mark.parametrize("prompt", [[1, "2"], [1, 2.0], [True, 3], [[1, None]], [1, [2]]])
def test_non_integer_token_ids_are_refused(prompt: Any) -> None:
    assert refused_field(parse_completion, {"prompt": prompt}) == "prompt"


@pytest.mark.parametrize("prompt", [None, 5, {"text": "x"}])
def test_prompt_of_wrong_type_is_refused(prompt: Any) -> None:
    assert refused_field(parse_completion, {"prompt": prompt}) == "prompt"


def test_missing_prompt_is_refused() -> None:
    assert refused_field(parse_completion, {"model": "m"}) == "prompt"


def test_echo_and_non_string_model_are_refused() -> None:
    assert refused_field(parse_completion, {"prompt": "x", "echo": True}) == "echo"
    assert refused_field(parse_completion, {"prompt": "x", "model": 3}) == "model"
    assert refused_field(parse_chat, {"messages": [{"role": "user"}], "model": ["m"]}) == "model"


# ---- sampling fields ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 0, "1", 1.0])
def test_n_other_than_one_is_refused(n: Any) -> None:
    assert refused_field(parse_completion, {"prompt": "x", "n": n}) == "n"


def test_n_one_or_null_is_accepted() -> None:
    parse_completion({"prompt": "x", "n": 1})
    parse_completion({"prompt": "x", "n": None})


@pytest.mark.parametrize("value", [0, -1, "x", 2.5, True])
def test_bad_max_tokens_is_refused_naming_max_tokens(value: Any) -> None:
    assert refused_field(parse_completion, {"prompt": "x", "max_tokens": value}) == "max_tokens"


def test_max_tokens_accepted() -> None:
    assert parse_completion({"prompt": "x", "max_tokens": 7}).sampling.max_tokens == 7
    assert parse_completion({"prompt": "x", "max_tokens": None}).sampling.max_tokens is None


def test_completion_ignores_max_completion_tokens() -> None:
    req = parse_completion({"prompt": "x", "max_completion_tokens": 3})
    assert req.sampling.max_tokens is None


def test_stop_as_string_and_as_list() -> None:
    assert parse_completion({"prompt": "x", "stop": "\n"}).sampling.stop == ("\n",)
    assert parse_completion({"prompt": "x", "stop": ["a", "bc"]}).sampling.stop == ("a", "bc")
    assert parse_completion({"prompt": "x", "stop": None}).sampling.stop == ()
    assert parse_completion({"prompt": "x"}).sampling.stop == ()


@pytest.mark.parametrize("stop", [5, ["a", 1], {"a": 1}, [None]])
def test_bad_stop_is_refused(stop: Any) -> None:
    assert refused_field(parse_completion, {"prompt": "x", "stop": stop}) == "stop"


def test_too_many_stop_strings_are_refused() -> None:
    ok = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert len(parse_completion({"prompt": "x", "stop": ok}).sampling.stop) == MAX_STOP_STRINGS
    body = {"prompt": "x", "stop": [*ok, "one more"]}
    assert refused_field(parse_completion, body) == "stop"


@pytest.mark.parametrize("seed", [0, 42, 2**64 - 1])
def test_seed_in_range_is_kept(seed: int) -> None:
    assert parse_completion({"prompt": "x", "seed": seed}).sampling.seed == seed


@pytest.mark.parametrize("seed", [-1, 2**64, "7", 1.5])
def test_seed_out_of_range_or_wrong_type_is_refused(seed: Any) -> None:
    assert refused_field(parse_completion, {"prompt": "x", "seed": seed}) == "seed"


def test_sampling_fields_are_carried_over() -> None:
    req = parse_completion({
        "prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 40, "ignore_eos": True,
        "stop_token_ids": [2, 7], "max_tokens": 4,
    })
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.ignore_eos, s.stop_token_ids, s.max_tokens) == (
        0.0, 0.5, 40, True, (2, 7), 4
    )


def test_sampling_defaults() -> None:
    s = parse_completion({"prompt": "x"}).sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.ignore_eos, s.stop_token_ids) == (
        1.0, 1.0, 0, None, False, ()
    )


def test_top_k_minus_one_means_off() -> None:
    assert parse_completion({"prompt": "x", "top_k": -1}).sampling.top_k == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": "1"}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
])
def test_other_bad_sampling_fields_name_themselves(body: dict[str, Any], field: str) -> None:
    assert refused_field(parse_completion, {"prompt": "x", **body}) == field


def test_non_string_user_is_no_tenant() -> None:
    assert parse_completion({"prompt": "x", "user": 5}).tenant == ""


# ---- /v1/chat/completions ----------------------------------------------------------------------

def test_chat_messages_parsed() -> None:
    req = parse_chat({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]})
    assert req.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
    assert req.prompt_field == "messages"
    assert req.text is None and req.token_ids is None
    assert req.request_id.startswith("chatcmpl-")


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "hi"},
                                  {"messages": None}, {"messages": {"role": "user"}}])
def test_missing_or_empty_messages_are_refused(body: dict[str, Any]) -> None:
    assert refused_field(parse_chat, body) == "messages"


@pytest.mark.parametrize("msg", [{"content": "x"}, {"role": 1, "content": "x"}, "user: x", None])
def test_message_without_string_role_names_its_index(msg: Any) -> None:
    body = {"messages": [{"role": "user", "content": "ok"}, msg]}
    assert refused_field(parse_chat, body) == "messages[1]"


def test_content_as_text_parts_is_joined() -> None:
    req = parse_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"},
    ]}]})
    assert req.messages == (ChatMessage("user", "Hello, world"),)


def test_null_or_missing_content_is_empty_text() -> None:
    req = parse_chat({"messages": [{"role": "assistant", "content": None}, {"role": "user"}]})
    assert req.messages == (ChatMessage("assistant", ""), ChatMessage("user", ""))


@pytest.mark.parametrize("content", [
    [{"type": "image_url", "image_url": {"url": "http://x"}}],
    [{"type": "text", "text": "a"}, "b"],
    5,
    {"type": "text", "text": "a"},
])
def test_non_text_content_names_the_message_content(content: Any) -> None:
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": content}]}
    assert refused_field(parse_chat, body) == "messages[1].content"


def test_chat_prefers_max_completion_tokens_over_max_tokens() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    both = parse_chat({"messages": msgs, "max_completion_tokens": 5, "max_tokens": 9})
    assert both.sampling.max_tokens == 5
    legacy = parse_chat({"messages": msgs, "max_tokens": 9})
    assert legacy.sampling.max_tokens == 9
    null_new = parse_chat({"messages": msgs, "max_completion_tokens": None, "max_tokens": 3})
    assert null_new.sampling.max_tokens == 3


def test_chat_bad_max_completion_tokens_names_that_field() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    body = {"messages": msgs, "max_completion_tokens": 0, "max_tokens": 9}
    assert refused_field(parse_chat, body) == "max_completion_tokens"
    assert refused_field(parse_chat, {"messages": msgs, "max_tokens": -1}) == "max_tokens"


def test_chat_n_stop_and_seed_are_checked_too() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert refused_field(parse_chat, {"messages": msgs, "n": 2}) == "n"
    assert refused_field(parse_chat, {"messages": msgs, "stop": 1}) == "stop"
    assert refused_field(parse_chat, {"messages": msgs, "seed": -5}) == "seed"
    req = parse_chat({"messages": msgs, "stop": "x", "seed": 3, "user": "t"})
    assert (req.sampling.stop, req.sampling.seed, req.tenant) == (("x",), 3, "t")


def test_completions_default_to_openais_16_tokens_chat_to_the_servers() -> None:
    from conductor.openai_protocol import parse_chat, parse_completion

    assert parse_completion({"prompt": "hi"}).default_max_tokens == 16
    assert parse_chat({"messages": [{"role": "user", "content": "hi"}]}).default_max_tokens is None
