"""pantry.v1.Generation over gRPC (asyncio): proto in, domain events out as proto."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from pantry.common.errors import InvalidRequest, Overloaded, Unavailable
from pantry.v1 import generation_pb2, generation_pb2_grpc

from .conductor import Conductor
from .requests import (
    ChatMessage,
    GenerationEvent,
    GenerationRequest,
    PromptAccepted,
    Sampling,
    TokensGenerated,
)

SERVICE_NAME = "pantry.v1.Generation"


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that did not parse: carried into the handler so the caller gets INVALID_ARGUMENT
    with the parser's reason, instead of grpc's UNKNOWN."""

    reason: str


def parse_request(data: bytes) -> generation_pb2.GenerateRequest | MalformedRequest:
    try:
        return generation_pb2.GenerateRequest.FromString(data)
    except DecodeError as exc:
        return MalformedRequest(str(exc))


def request_from_proto(msg: generation_pb2.GenerateRequest) -> GenerationRequest:
    """The message as the conductor's request, values as sent: Conductor.admit checks their
    ranges (SamplingParams, check_prompt) once for every API, naming the field."""
    s = msg.sampling
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("prompt", "is required: set text, token_ids or chat")
    sampling = Sampling(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p or 1.0,                  # proto3's unset 0 means off; a negative is refused
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=s.max_tokens or None,       # 0 = the server's default; a negative is refused
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        stop_token_ids=tuple(s.stop_token_ids),
    )
    return GenerationRequest(
        request_id=msg.request_id or f"gen-{uuid.uuid4().hex}",
        model=msg.model,
        text=msg.text if which == "text" else None,
        token_ids=tuple(msg.token_ids.ids) if which == "token_ids" else None,
        messages=(
            tuple(ChatMessage(m.role, m.content) for m in msg.chat.messages)
            if which == "chat" else None
        ),
        sampling=sampling,
        tenant=msg.tenant,
        prompt_field=which,
    )


def event_to_proto(request_id: str, event: GenerationEvent) -> generation_pb2.GenerateResponse:
    if isinstance(event, PromptAccepted):
        return generation_pb2.GenerateResponse(
            request_id=request_id, prompt_token_ids=list(event.prompt_token_ids)
        )
    if isinstance(event, TokensGenerated):
        return generation_pb2.GenerateResponse(
            request_id=request_id, token_ids=list(event.token_ids), text=event.text
        )
    u = event.usage
    return generation_pb2.GenerateResponse(
        request_id=request_id,
        text=event.text,
        finish_reason=event.finish_reason,
        usage=generation_pb2.Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens,
            ttft_ms=u.ttft_s * 1000,
            prefill_skipped=u.prefill_skipped,
        ),
    )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, conductor: Conductor) -> None:
        self.conductor = conductor

    async def Generate(  # noqa: N802
        self, request: generation_pb2.GenerateRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if isinstance(request, MalformedRequest):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a GenerateRequest: {request.reason}",
            )
            return
        try:
            req = request_from_proto(request)
            events = self.conductor.generate(req)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event_to_proto(req.request_id, event)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_request,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString,
        ),
    })
    server.add_generic_rpc_handlers((handler,))
