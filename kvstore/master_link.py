"""A channel to the pool's master that follows the leader among several masters.

`MasterLink` stands where a `grpc.Channel` would (`KVMasterStub(MasterLink(...))`), so clients
and nodes keep calling the stub's methods. A call answered UNAVAILABLE (the master is down, or
is a standby: "standby; leader is HOST:PORT") is tried again on the leader that answer names,
then on the other masters in turn, with a short backoff, for at most `failover_s`; then the
last UNAVAILABLE goes to the caller. Any other status is the caller's at once, and so is a
call that ran out of its own deadline: only a refused call is retried.

Retrying is safe for every KVMaster RPC: a put whose start was lost with a dead leader is a
pending put the next leader reclaims, sealing is idempotent for its token, and the rest read
or remove.

Streams (`WatchEvents`) go to the master the link last found leading; a caller that follows a
stream opens it again when it ends UNAVAILABLE.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from kvstore.auth import open_channel
from kvstore.config import master_addresses

log = logging.getLogger(__name__)

# A standby's answer names the leader in these words (kvstore.master_role says them).
STANDBY_PREFIX = "standby; leader is "
_LEADER = re.compile(re.escape(STANDBY_PREFIX) + r"(\S+:\d+)")
# Lease TTL (3 s by default) + the standby's next try + rebuilding from Redis, with room.
DEFAULT_FAILOVER_S = 15.0
_BACKOFF_S = (0.05, 0.1, 0.2, 0.4)


def leader_named(details: str | None) -> str | None:
    """The leader's address in a standby's refusal, if it names one."""
    m = _LEADER.search(details or "")
    return m.group(1) if m else None


class MasterLink:
    """`masters`: "HOST:PORT" or "HOST:PORT,HOST:PORT" (`kvstore.config.master_addresses`)."""

    def __init__(self, masters: str, token: str, max_message_bytes: int | None = None,
                 failover_s: float | None = None) -> None:
        """`failover_s`: how long a refused call keeps trying; None: DEFAULT_FAILOVER_S with
        several masters, 0 with one (an engine whose only master is down must get its miss at
        once and compute, not wait out a failover that has nowhere to go)."""
        self.addresses = list(master_addresses(masters))
        self._token = token
        self._max_message_bytes = max_message_bytes
        if failover_s is None:
            failover_s = DEFAULT_FAILOVER_S if len(self.addresses) > 1 else 0.0
        self.failover_s = failover_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._current = self.addresses[0]
        self._closed = False
        self.failovers = 0  # times a call moved on to another master

    @property
    def current(self) -> str:
        """The master the next call goes to first."""
        return self._current

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                # As a closed grpc.Channel does: a closed client must not quietly reconnect.
                raise ValueError("Cannot invoke RPC: the master link is closed")
            ch = self._channels.get(address)
            if ch is None:
                ch = (open_channel(address, self._token) if self._max_message_bytes is None
                      else open_channel(address, self._token, self._max_message_bytes))
                self._channels[address] = ch
            return ch

    def _next(self, failed: str, details: str | None) -> str:
        """Where to go after `failed` refused: the leader it named, else the next master.
        Only a leader among our addresses is followed: a name we were not given may be one
        only the masters can resolve (or 0.0.0.0, which would reach our own host)."""
        named = leader_named(details)
        if named and named != failed and named in self.addresses:
            target = named
        else:
            i = self.addresses.index(failed) if failed in self.addresses else -1
            target = self.addresses[(i + 1) % len(self.addresses)]
        with self._lock:
            moved = self._current == failed and target != failed
            if moved:
                self._current = target
        if moved:
            # Once per move, not per attempt: a master that is down for seconds must not
            # flood the log (a caller may not drain its output).
            log.info("master %s unavailable (%s); following %s", failed, details, target)
        return target

    def call(self, method: str, request: Any, serializer: Callable[..., bytes] | None,
             deserializer: Callable[[bytes], Any] | None, **kwargs: Any) -> Any:
        address = self._current
        give_up = time.monotonic() + self.failover_s
        attempt = 0
        followed: set[str] = set()
        while True:
            call = self._channel(address).unary_unary(
                method, request_serializer=serializer, response_deserializer=deserializer)
            try:
                return call(request, **kwargs)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise
                details = e.details() if isinstance(e, grpc.Call) else None
            nxt = self._next(address, details)
            log.debug("master %s unavailable (%s); trying %s", address, details, nxt)
            self.failovers += 1
            # Straight on to a leader named and listed, once per call (two standbys that name
            # each other while the lease changes hands must not spin); otherwise a pause.
            if nxt != leader_named(details) or nxt in followed:
                time.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
            followed.add(nxt)
            address = nxt

    # ---- the part of grpc.Channel a generated stub uses -------------------------------------

    def unary_unary(self, method: str, request_serializer: Callable[..., bytes] | None = None,
                    response_deserializer: Callable[[bytes], Any] | None = None,
                    **_: Any) -> Callable[..., Any]:
        def invoke(request: Any, **kwargs: Any) -> Any:
            return self.call(method, request, request_serializer, response_deserializer,
                             **kwargs)

        return invoke

    def unary_stream(self, method: str, request_serializer: Callable[..., bytes] | None = None,
                     response_deserializer: Callable[[bytes], Any] | None = None,
                     **_: Any) -> Callable[..., Iterator[Any]]:
        def invoke(request: Any, **kwargs: Any) -> Iterator[Any]:
            stream = self._channel(self._current).unary_stream(
                method, request_serializer=request_serializer,
                response_deserializer=response_deserializer)
            return stream(request, **kwargs)  # type: ignore[no-any-return]

        return invoke

    def refused(self, error: grpc.RpcError) -> None:
        """A stream from the current master ended with `error`: move on as a call would."""
        if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.UNAVAILABLE:
            self._next(self._current, error.details())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close()
