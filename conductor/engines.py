"""Async clients for the engines, converting protobuf to domain types at this edge."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc

from pantry.common.engine_info import EngineDescription, EngineLoad
from pantry.common.errors import InvalidRequest, Overloaded, Unavailable
from pantry.common.sampling import SamplingParams
from pantry.common.serving import grpc_options
from pantry.common.wire import info_from_proto, load_from_proto, sampling_to_proto
from pantry.v1 import engine_pb2, engine_pb2_grpc


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    pool_tokens: int
    computed_tokens: int


@dataclass(frozen=True)
class DecodeChunk:
    token_ids: tuple[int, ...]
    finish_reason: str
    pool_tokens: int
    computed_tokens: int


def error_from_rpc(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        detail = exc.details() or "invalid request"
        field, _, message = detail.partition(": ")
        return InvalidRequest(field if message else "request", message or detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(exc.details() or f"engine {address} is full")
    return Unavailable(f"engine {address}: {code.name}: {exc.details()}")


class EngineClient:
    """What both engine roles answer (Info, Load); subclasses add their own stub's calls."""

    _stub: Any  # a PrefillEngineStub or DecodeEngineStub: both have Info and Load

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=grpc_options())

    async def close(self) -> None:
        await self._channel.close()

    async def info(self, timeout: float = 5.0) -> EngineDescription:
        msg = await self._stub.Info(engine_pb2.EngineInfoRequest(), timeout=timeout)
        return info_from_proto(msg)

    async def load(self, timeout: float = 2.0) -> EngineLoad:
        msg = await self._stub.Load(engine_pb2.EngineLoadRequest(), timeout=timeout)
        return load_from_proto(msg)


class PrefillClient(EngineClient):
    def __init__(self, address: str, timeout_s: float) -> None:
        super().__init__(address, timeout_s)
        self._stub = engine_pb2_grpc.PrefillEngineStub(self._channel)

    async def prefill(
        self, request_id: str, tokens: tuple[int, ...], tenant: str, sampling: SamplingParams
    ) -> PrefillResult:
        req = engine_pb2.PrefillRequest(
            request_id=request_id,
            token_ids=list(tokens),
            tenant=tenant,
            sampling=sampling_to_proto(sampling),
        )
        try:
            msg = await self._stub.Prefill(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.address) from exc
        return PrefillResult(msg.first_token, msg.pool_tokens, msg.computed_tokens)


class DecodeClient(EngineClient):
    def __init__(self, address: str, timeout_s: float) -> None:
        super().__init__(address, timeout_s)
        self._stub = engine_pb2_grpc.DecodeEngineStub(self._channel)

    async def decode(
        self, request_id: str, tokens: tuple[int, ...], tenant: str, sampling: SamplingParams,
        first_token: int | None,
    ) -> AsyncGenerator[DecodeChunk, None]:
        req = engine_pb2.DecodeRequest(
            request_id=request_id,
            token_ids=list(tokens),
            tenant=tenant,
            sampling=sampling_to_proto(sampling),
        )
        if first_token is not None:
            req.first_token = first_token
        call = self._stub.Decode(req, timeout=self.timeout_s)
        try:
            async for msg in call:
                yield DecodeChunk(
                    tuple(msg.token_ids), msg.finish_reason, msg.pool_tokens, msg.computed_tokens
                )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.address) from exc
        finally:
            call.cancel()
