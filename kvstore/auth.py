"""The pool's service token: every kvstore RPC carries it, gRPC and TCP alike.

One secret per deployment (`pantry local` makes one per run), read from a file named by
`--token-file` or, for a client built without one, by $PANTRY_TOKEN_FILE. A server with a token
answers a call without it, or with another, UNAUTHENTICATED and nothing else: the check runs
before any handler looks at the request. A server without one asks for nothing.

gRPC carries it in the `pantry-token` metadata header of every call; the bulk TCP transport
in a handshake that opens each connection (`kvstore.transports.tcp`).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from pantry.common.config_flags import MIB
from pantry.common.errors import ConfigError
from pantry.common.serving import grpc_options

TOKEN_HEADER = "pantry-token"
TOKEN_FILE_ENV = "PANTRY_TOKEN_FILE"
MAX_TOKEN_BYTES = 1024
UNAUTHENTICATED = "a valid pantry service token is required"
# A master that restarts is back in well under a second: retry connecting at that pace, not
# at gRPC's default backoff of 1 s doubling to 2 minutes.
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000)]


def load_token(path: str | None) -> str:
    """The token in file `path` (surrounding whitespace dropped); "" (no token) for None."""
    if path is None:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"token_file: cannot read {path}: {e}") from e
    if not token or len(token.encode()) > MAX_TOKEN_BYTES or not token.isprintable():
        raise ConfigError(f"token_file: {path} must hold one line of 1 to {MAX_TOKEN_BYTES} "
                          "printable characters")
    return token


def token_from_env() -> str:
    """The token in the file $PANTRY_TOKEN_FILE names; "" when it is unset."""
    return load_token(os.environ.get(TOKEN_FILE_ENV) or None)


def token_matches(expected: str, given: str | bytes) -> bool:
    """Constant-time; anything goes when no token is expected."""
    if not expected:
        return True
    got = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(expected.encode(), got)


def _refuse(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Checks the token of every call to `services` before any handler runs, so no RPC, old or
    new, can forget it. A refused call's request is not even parsed (the refusal handler has no
    deserializer). Health and reflection stay open, as probes need them."""

    def __init__(self, token: str, services: Sequence[str]) -> None:
        self._token = token
        self._prefixes = tuple(f"/{s}/" for s in services)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if not self._token or not details.method.startswith(self._prefixes):
            return continuation(details)
        given = next((v for k, v in details.invocation_metadata or () if k == TOKEN_HEADER), "")
        if token_matches(self._token, given):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without a token
        if handler.request_streaming:
            return (grpc.stream_stream_rpc_method_handler(_refuse) if handler.response_streaming
                    else grpc.stream_unary_rpc_method_handler(_refuse))
        return (grpc.unary_stream_rpc_method_handler(_refuse) if handler.response_streaming
                else grpc.unary_unary_rpc_method_handler(_refuse))


def token_interceptors(token: str, services: Sequence[str]) -> list[grpc.ServerInterceptor]:
    """What a kvstore server installs (`create_grpc_server(interceptors=...)`): none when
    there is no token."""
    return [TokenInterceptor(token, services)] if token else []


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _AddToken(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> _Details:
        metadata = [*(details.metadata or ()), (TOKEN_HEADER, self._token)]
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any],
                               details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)


def open_channel(address: str, token: str, max_message_bytes: int = 64 * MIB) -> grpc.Channel:
    """A channel to a kvstore server whose every call carries `token` (none when empty)."""
    channel = grpc.insecure_channel(address, options=[*grpc_options(max_message_bytes),
                                                      *_RECONNECT])
    return grpc.intercept_channel(channel, _AddToken(token)) if token else channel
