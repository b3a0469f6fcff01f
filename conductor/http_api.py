"""OpenAI-compatible HTTP API (aiohttp): completions, chat completions, models, health, metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pantry.common.errors import InvalidRequest, Overloaded, Unavailable

from .conductor import Conductor
from .openai_protocol import (
    ParsedRequest,
    error_json,
    now,
    parse_chat,
    parse_completion,
    usage_json,
)
from .requests import (
    GenerationFinished,
    PromptAccepted,
    TokensGenerated,
)

log = logging.getLogger(__name__)

CONDUCTOR_KEY: web.AppKey[Conductor] = web.AppKey("conductor", Conductor)


ERROR_TYPES = {400: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def _error(status: int, message: str, param: str | None = None,
           retry_after_s: float | None = None) -> web.Response:
    headers = {} if retry_after_s is None else {"Retry-After": str(math.ceil(retry_after_s))}
    return web.json_response(
        error_json(message, param, status, ERROR_TYPES.get(status, "server_error")),
        status=status, headers=headers,
    )


def _refusal(exc: InvalidRequest | Overloaded | Unavailable) -> web.Response:
    """An error before any byte was sent; a 429 says when to come back (RFC 9110 §10.2.3):
    an SLO refusal when the predicted excess has drained, any other overload in a second."""
    retry = None
    if isinstance(exc, Overloaded):
        retry = max(getattr(exc, "retry_after_s", 1.0), 1.0)
    return _error(*_status_of(exc), retry_after_s=retry)


def _status_of(exc: InvalidRequest | Overloaded | Unavailable) -> tuple[int, str, str | None]:
    """The one mapping from the conductor's named failures to HTTP: (status, message, param)."""
    if isinstance(exc, InvalidRequest):
        return 400, str(exc), exc.field
    return (429 if isinstance(exc, Overloaded) else 503), str(exc), None


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("body", f"is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    return body


def _choice_delta(chat: bool, text: str) -> dict[str, Any]:
    return {"delta": {"content": text}} if chat else {"text": text}


async def _serve(
    request: web.Request, parse: Callable[[dict[str, Any]], ParsedRequest], chat: bool
) -> web.StreamResponse:
    conductor = request.app[CONDUCTOR_KEY]
    try:
        parsed = parse(await _read_json(request))  # types and shapes; InvalidRequest names them
        req = parsed.generation
        stream, include_usage = parsed.stream, parsed.include_usage
        want_ids = parsed.return_token_ids
        events = conductor.generate(req)
        first = await anext(events)  # validation errors surface here, before any byte is sent
        assert isinstance(first, PromptAccepted)
    except (InvalidRequest, Overloaded, Unavailable) as exc:
        return _refusal(exc)
    obj = "chat.completion" if chat else "text_completion"
    base = {"id": req.request_id, "created": now(), "model": conductor.model_id}
    prompt_ids = list(first.prompt_token_ids)
    # Closing the generator right away (also when the client hangs up mid-stream) cancels the
    # decode stream, so the engine frees the sequence's blocks now, not at garbage collection.
    async with contextlib.aclosing(events):
        if stream:
            return await _stream(request, events, base, obj, chat, include_usage, want_ids,
                                 prompt_ids)
        return await _collect(events, base, obj, chat, want_ids, prompt_ids)


async def _collect(
    events: Any, base: dict[str, Any], obj: str, chat: bool, want_ids: bool,
    prompt_ids: list[int],
) -> web.Response:
    texts: list[str] = []
    ids: list[int] = []
    try:
        async for event in events:
            if isinstance(event, TokensGenerated):
                texts.append(event.text)
                ids.extend(event.token_ids)
            elif isinstance(event, GenerationFinished):
                texts.append(event.text)
                finished = event
    except (InvalidRequest, Overloaded, Unavailable) as exc:
        return _refusal(exc)
    text = "".join(texts)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finished.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if want_ids:
        choice["prompt_token_ids"] = prompt_ids
        choice["token_ids"] = ids
    return web.json_response(
        {**base, "object": obj, "choices": [choice], "usage": usage_json(finished.usage)}
    )


async def _stream(
    request: web.Request, events: Any, base: dict[str, Any], obj: str, chat: bool,
    include_usage: bool, want_ids: bool, prompt_ids: list[int],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    async def send(payload: dict[str, Any]) -> None:
        await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

    first_chunk = True
    try:
        async for event in events:
            if isinstance(event, TokensGenerated):
                choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None,
                                          **_choice_delta(chat, event.text)}
                if chat and first_chunk:
                    choice["delta"]["role"] = "assistant"
                if want_ids:
                    choice["token_ids"] = list(event.token_ids)
                    if first_chunk:
                        choice["prompt_token_ids"] = prompt_ids
                first_chunk = False
                await send({**base, "object": chunk_obj, "choices": [choice]})
            elif isinstance(event, GenerationFinished):
                choice = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None,
                          **_choice_delta(chat, event.text)}
                await send({**base, "object": chunk_obj, "choices": [choice]})
                if include_usage:
                    await send({**base, "object": chunk_obj, "choices": [],
                                "usage": usage_json(event.usage)})
    except (InvalidRequest, Overloaded, Unavailable) as exc:
        status, message, param = _status_of(exc)
        await send(error_json(message, param, status, ERROR_TYPES[status]))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat, chat=True)


async def models(request: web.Request) -> web.Response:
    conductor = request.app[CONDUCTOR_KEY]
    card = {
        "id": conductor.model_id,
        "object": "model",
        "created": now(),
        "owned_by": "pantry",
        "max_model_len": conductor.info.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    roles = await request.app[CONDUCTOR_KEY].fleet.refresh()
    ok = all(roles.values())
    return web.json_response(
        {"status": "ok" if ok else "degraded", "roles": roles}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CONDUCTOR_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONDUCTOR_KEY].config.max_request_bytes
        return _error(413, f"body: larger than the limit of {limit} bytes (max_request_bytes)")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise


def create_app(conductor: Conductor) -> web.Application:
    app = web.Application(
        client_max_size=conductor.config.max_request_bytes, middlewares=[errors_as_json]
    )
    app[CONDUCTOR_KEY] = conductor
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
