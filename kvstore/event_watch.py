"""Following the pool's events (`WatchEvents`) from the client side, across master failovers.

A stream that ends UNAVAILABLE (the leader died or stepped down) is opened again on the next
leader, resuming after the last event received. A new leader is another master run with its
own numbering: the watcher names the run it followed, and the new leader then streams from its
own first event, which replays what it recovered (a `stored` event per object), so a watcher
that keeps a picture of the pool ends up with the new leader's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from kvstore.events import EventGap, PoolEvent
from kvstore.master_link import DEFAULT_FAILOVER_S, MasterLink
from kvstore.wire import event_from_proto
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

_RETRY_S = 0.2


class EventWatcher:
    """Iterate it for events (and gaps); `close` (from any thread) ends the iteration."""

    def __init__(self, masters: str, token: str, *, from_seq: int = 0, prefix: str = "",
                 run_id: str = "", failover_s: float = DEFAULT_FAILOVER_S) -> None:
        """`from_seq` 0: only events from now on. `run_id`: the run `from_seq` counts in
        (empty: the current leader's)."""
        self._link = MasterLink(masters, token, failover_s=failover_s)
        self._stub = pb_grpc.KVMasterStub(self._link)
        self.prefix = prefix
        self.run_id = run_id
        self.next_seq = from_seq
        self._failover_s = failover_s
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._closed = False

    def _open(self) -> Iterator[pb.PoolEvent]:
        call = self._stub.WatchEvents(pb.WatchEventsRequest(
            from_seq=self.next_seq, prefix=self.prefix, run_id=self.run_id))
        with self._lock:
            self._call = call  # type: ignore[assignment]
            if self._closed:
                call.cancel()  # type: ignore[attr-defined]
        return call  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[PoolEvent | EventGap]:
        give_up = time.monotonic() + self._failover_s
        while not self._closed:
            try:
                for msg in self._open():
                    give_up = time.monotonic() + self._failover_s
                    event = event_from_proto(msg)
                    if event is None:
                        continue
                    if isinstance(event, PoolEvent):
                        self.run_id, self.next_seq = event.run_id, event.seq + 1
                    yield event
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if self._closed or code is grpc.StatusCode.CANCELLED:
                    return
                if code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise
                self._link.refused(e)
                time.sleep(_RETRY_S)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            call = self._call
        if call is not None:
            call.cancel()
        self._link.close()
