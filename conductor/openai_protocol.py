"""OpenAI request bodies -> GenerationRequest, and responses back, with field-naming errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from pantry.common.errors import InvalidRequest

from .requests import ChatMessage, GenerationRequest, Sampling, Usage

MAX_STOP_STRINGS = 16
# OpenAI's documented default for /v1/completions; chat has none, so the server's applies.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, f"must be a number, got {type(value).__name__}")
    return float(value)


def _int(body: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be true or false, got {value!r}")
    return value


def _token_list(value: Any, name: str) -> tuple[int, ...]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequest(name, "token id lists must hold only integers")
    return tuple(value)


def parse_sampling(body: Mapping[str, Any], max_tokens_names: tuple[str, ...]) -> Sampling:
    n = _int(body, "n", 1)
    if n != 1:
        raise InvalidRequest("n", "only n=1 is supported; send one request per completion")
    max_tokens = None
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _int(body, name, None)
            if max_tokens is not None and max_tokens < 1:
                raise InvalidRequest(name, f"must be at least 1, got {max_tokens}")
            break
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise InvalidRequest("stop_token_ids", "must be a list of token ids")
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidRequest("seed", "must be between 0 and 2**64 - 1")
    top_k = _int(body, "top_k", 0)
    return Sampling(
        temperature=_number(body, "temperature", 1.0),
        top_k=0 if top_k is None or top_k < 0 else top_k,  # vLLM: -1 means off
        top_p=_number(body, "top_p", 1.0),
        seed=seed,
        max_tokens=max_tokens,
        stop=stops,
        ignore_eos=_bool(body, "ignore_eos"),
        stop_token_ids=_token_list(stop_ids, "stop_token_ids"),
    )


def _tenant(body: Mapping[str, Any]) -> str:
    tenant = body.get("user") or ""
    return tenant if isinstance(tenant, str) else ""


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    if body.get("echo"):
        raise InvalidRequest("echo", "echo is not supported")
    if "prompt" not in body:
        raise InvalidRequest("prompt", "is required")
    prompt = body["prompt"]
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequest("prompt", "batches are not supported; send one prompt")
        ids = _token_list(prompt[0], "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequest("prompt", "batches are not supported; send one prompt")
        text = prompt[0]
    elif isinstance(prompt, list):
        ids = _token_list(prompt, "prompt")
    else:
        raise InvalidRequest("prompt", "must be a string or a list of token ids")
    if (text is not None and not text) or (ids is not None and not ids):
        raise InvalidRequest("prompt", "is empty; send at least one token")
    return GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        text=text,
        token_ids=ids,
        sampling=parse_sampling(body, ("max_tokens",)),
        tenant=_tenant(body),
        prompt_field="prompt",
        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
    )


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    f"messages[{index}].content", "only text parts are supported"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if value is None:
        return ""
    raise InvalidRequest(f"messages[{index}].content", "must be a string or text parts")


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content}")
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidRequest(f"messages[{i}]", "must be an object with a string 'role'")
        parsed.append(ChatMessage(msg["role"], _content(msg.get("content"), i)))
    return GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        messages=tuple(parsed),
        sampling=parse_sampling(body, ("max_completion_tokens", "max_tokens")),
        tenant=_tenant(body),
        prompt_field="messages",
    )


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        # Pantry's own additions; OpenAI clients ignore unknown usage fields.
        "ttft_ms": round(usage.ttft_s * 1000, 3),
        "prefill_skipped": usage.prefill_skipped,
    }


def error_json(message: str, param: str | None, code: int, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
