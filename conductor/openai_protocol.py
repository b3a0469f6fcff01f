"""OpenAI request bodies as pydantic models, converted once to a GenerationRequest; responses.

The models check types and shapes, the way vLLM and SGLang define theirs. Value ranges
(temperature >= 0, 0 < top_p <= 1, a max_tokens that fits the context, token ids inside the
vocabulary, ...) are not checked here: SamplingParams and check_prompt check them once, in
Conductor.admit, for every API alike.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from pantry.common.errors import InvalidRequest

from .requests import ChatMessage, GenerationRequest, Sampling, Usage

# OpenAI's documented default for /v1/completions; chat has none, so the server's applies.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# ---- shapes ------------------------------------------------------------------------------------
# A union is picked by the JSON kind of the value, so an error comes from the one member the
# caller meant (["a", 1] is a bad list of strings, not also a bad string). Member tags start
# with "<" so that the error's location can drop them: no field name does.

def _json_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<string>"
    if isinstance(value, list):
        return "<list>"
    return None


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<string>"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, list):
        return "<token id lists>"
    if isinstance(first, str):
        return "<strings>"
    return "<token ids>"


def _one_prompt(prompts: list[Any]) -> list[Any]:
    if len(prompts) != 1:
        raise PydanticCustomError("batch", "batches are not supported; send one prompt")
    return prompts


def _only_one(n: int) -> int:
    if n != 1:
        raise PydanticCustomError(
            "n", "only n=1 is supported; send one request per completion, got {n}", {"n": n}
        )
    return n


def _refused(value: bool) -> bool:
    if value:
        raise PydanticCustomError("unsupported", "is not supported; leave it out or send false")
    return value


Text = Annotated[str, Field(min_length=1)]
TokenIds = list[int]
Prompt = Annotated[
    Annotated[Text, Tag("<string>")]
    | Annotated[TokenIds, Tag("<token ids>")]
    | Annotated[list[TokenIds], AfterValidator(_one_prompt), Tag("<token id lists>")]
    | Annotated[list[Text], AfterValidator(_one_prompt), Tag("<strings>")],
    Discriminator(_prompt_kind, custom_error_type="prompt",
                  custom_error_message="must be a string or a list of token ids"),
]
Stop = Annotated[
    Annotated[str, Tag("<string>")]
    | Annotated[list[str], Tag("<list>")],
    Discriminator(_json_kind, custom_error_type="stop",
                  custom_error_message="must be a string or a list of strings"),
]
OnlyOne = Annotated[int, AfterValidator(_only_one)]
Refused = Annotated[bool, AfterValidator(_refused)]


class _Body(BaseModel):
    # Strict: "1" is not 1, 1.0 is not an integer, 1 is not true. Unknown fields are ignored:
    # clients send OpenAI options Pantry does not implement.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


Content = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[TextPart], Tag("<list>")],
    Discriminator(_json_kind, custom_error_type="content",
                  custom_error_message="must be a string or a list of text parts"),
]


class Message(_Body):
    role: str
    content: Content | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Request(_Body):
    """What both endpoints accept besides the prompt."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Stop | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool | None = None
    n: OnlyOne | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool | None = None

    def sampling(self, max_tokens: int | None) -> Sampling:
        stop = self.stop
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=0 if self.top_k is None or self.top_k == -1 else self.top_k,  # vLLM: -1 = off
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=tuple(self.stop_token_ids or ()),
        )


class CompletionRequest(_Request):
    prompt: Prompt
    echo: Refused | None = None

    def text_or_token_ids(self) -> tuple[str | None, tuple[int, ...] | None]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt, None
        # A batch of one prompt is that prompt (_one_prompt refused larger ones).
        one: object = prompt[0] if prompt and isinstance(prompt[0], str | list) else prompt
        if isinstance(one, str):
            return one, None
        assert isinstance(one, list)
        return None, tuple(one)


class ChatCompletionRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None


# ---- what the HTTP layer serves ----------------------------------------------------------------

@dataclass(frozen=True)
class ParsedRequest:
    """A valid OpenAI request: what to generate, and how to answer it."""

    generation: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


def _answer(body: _Request, generation: GenerationRequest) -> ParsedRequest:
    opts = body.stream_options
    return ParsedRequest(
        generation=generation,
        stream=bool(body.stream),
        include_usage=bool(opts and opts.include_usage),
        return_token_ids=bool(body.return_token_ids),
    )


def parse_completion(body: Mapping[str, Any]) -> ParsedRequest:
    req = _validate(CompletionRequest, body)
    text, token_ids = req.text_or_token_ids()
    generation = GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=req.model or "",
        text=text,
        token_ids=token_ids,
        sampling=req.sampling(req.max_tokens),
        tenant=req.user or "",
        prompt_field="prompt",
        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
    )
    return _answer(req, generation)


def parse_chat(body: Mapping[str, Any]) -> ParsedRequest:
    req = _validate(ChatCompletionRequest, body)
    newer = req.max_completion_tokens is not None
    generation = GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=req.model or "",
        messages=tuple(ChatMessage(m.role, m.text()) for m in req.messages),
        sampling=req.sampling(req.max_completion_tokens if newer else req.max_tokens),
        tenant=req.user or "",
        prompt_field="messages",
        max_tokens_field="max_completion_tokens" if newer else "max_tokens",
    )
    return _answer(req, generation)


# ---- validation errors as InvalidRequest -------------------------------------------------------

_TYPE_MESSAGES = {
    "missing": "is required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "literal_error": "must be {expected}",
    "string_too_short": "must not be empty",
    "too_long": "must have at most {max_length} items, got {actual_length}",
}
_OBJECT_SHAPES = {
    "CompletionRequest": "must be a JSON object",
    "ChatCompletionRequest": "must be a JSON object",
    "Message": 'must be an object like {"role": "user", "content": "..."}',
    "TextPart": 'must be a text part like {"type": "text", "text": "..."}',
    "StreamOptions": 'must be an object like {"include_usage": true}',
}


R = TypeVar("R", CompletionRequest, ChatCompletionRequest)


def _validate(model: type[R], body: Mapping[str, Any]) -> R:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors()[0]) from None


def param_of(loc: tuple[str | int, ...]) -> str:
    """('messages', 2, 'content') -> 'messages[2].content'; union member tags are dropped."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not part.startswith("<"):
            param += f".{part}" if param else part
    return param or "body"


def invalid_request(error: ErrorDetails) -> InvalidRequest:
    """One pydantic error as the field to change and what to change it to."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "model_type":
        message = _OBJECT_SHAPES.get(ctx.get("class_name", ""), "must be an object")
    elif kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind].format(**ctx)
    else:  # our own PydanticCustomErrors, already worded for the caller
        return InvalidRequest(param_of(error["loc"]), error["msg"])
    if kind not in ("missing", "too_long", "string_too_short"):
        message += f", got {_describe(error['input'])}"
    return InvalidRequest(param_of(error["loc"]), message)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str) and len(value) > 40:
        return f"a string of {len(value)} characters"
    return json.dumps(value)


# ---- responses ---------------------------------------------------------------------------------

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
