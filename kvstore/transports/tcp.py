"""The client side of the bulk TCP transport (framing in `tcp_frames`, the node's side in
`tcp_server`).

The client sends an object's header and payload as they are and can receive a read straight
into its caller's buffers (`read_into`), so each direction is one copy on either side of the
socket. The requests of one call are pipelined: all of a put's batches go out back to back and
their answers are read after, as the plain socket loop it is measured against streams its
bytes, instead of the link idling for a round trip per batch. Reads are pipelined only as far
as their requests fit in the socket's buffers (the node answers with bulk while it is not
reading), so neither side can wait on the other.

A write's parts are taken from each op only when its batch goes out: an object whose payload
is still being hashed (the writer's `PendingObject`) holds back only its own batch, so the
hashing of later objects runs while earlier ones are on the wire. Every request is split to
the node's limits (asked for with the handshake), so the node never has to refuse a write too
large to drain, which it answers by dropping the connection.
"""

from __future__ import annotations

import queue
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from kvstore.grants import WriteGrant
from kvstore.transports import (
    Landed,
    ReadInto,
    TransportError,
    WriteData,
    batches,
    parts_of,
)
from kvstore.transports.tcp_frames import (
    AUTH,
    AUTH_MAGIC,
    GRANT,
    LIMITS,
    MAGIC,
    MISS,
    OK,
    OP,
    OP_LIMITS,
    OP_READ,
    OP_SSD_READ,
    OP_WRITE,
    REQ,
    RESP,
    SSD_OP,
    drain,
    recv_exact,
    recv_into,
    send_parts,
)

# Request bytes (not payload) a client sends ahead of the answers it has read: far below the
# smallest socket buffers, so a node busy sending an answer never blocks the client's send.
_READ_AHEAD_BYTES = 32 * 1024

T = TypeVar("T")
U = TypeVar("U")
# One request: its head, then what a write carries (each op's parts, taken when it is sent).
Frame = list[WriteData]
Receive = Callable[[socket.socket, int], T]  # the answer to request i, read off the socket


class _Refused(Exception):
    """The node answered a request with an error (its message)."""


def _answer(sock: socket.socket) -> tuple[int, int]:
    """(status, body length) of the next answer; a refusal's message raised as _Refused."""
    magic, status, length = RESP.unpack(recv_exact(sock, RESP.size))
    if magic != MAGIC:
        raise TransportError("tcp peer answered with a bad frame")
    if status not in (OK, MISS):
        raise _Refused(recv_exact(sock, length).decode(errors="replace"))
    return status, length


class TcpTransport:
    """Client side; a small pool of connections so concurrent callers do not serialize."""

    name = "tcp"

    def __init__(self, address: str, timeout_s: float, epoch: int = 0,
                 batch_bytes: int = 16 * 1024 * 1024, token: str = "") -> None:
        self._token = token.encode()
        host, _, port = address.rpartition(":")
        self._addr = (host, int(port))
        self._timeout = timeout_s
        self._epoch = epoch
        self._batch_bytes = batch_bytes
        # The node's (largest object, most ops, most bytes) per request, from the first
        # handshake; None until then.
        self._limits: tuple[int, int, int] | None = None
        self._pool: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._closed = False

    def _conn(self) -> socket.socket:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        try:
            s = socket.create_connection(self._addr, timeout=self._timeout)
        except OSError as e:
            raise TransportError(f"tcp connect to {self._addr} failed: {e}") from e
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # The limits request rides with the handshake: no round trip of its own.
            s.sendall(AUTH.pack(AUTH_MAGIC, len(self._token)) + self._token
                      + REQ.pack(MAGIC, OP_LIMITS, 0, 0))
            # The handshake's answer, then (unless it was refused and the connection closed)
            # the limits'.
            for _ in range(2):
                magic, status, length = RESP.unpack(recv_exact(s, RESP.size))
                body = recv_exact(s, length) if magic == MAGIC else b""
                if magic != MAGIC or status != OK:
                    break
        except (OSError, struct.error) as e:
            s.close()
            raise TransportError(f"tcp handshake with {self._addr} failed: {e}") from e
        if magic != MAGIC or status != OK or length != LIMITS.size:
            s.close()
            why = body.decode(errors="replace") if status != OK else "no limits in its answer"
            raise TransportError(f"node refused: {why}")
        self._limits = LIMITS.unpack(body)
        return s

    def _batches(self, items: Sequence[U], sizes: Sequence[int]) -> list[list[U]]:
        """Consecutive groups of `items` that fit one request of this client (batch_bytes)
        and of the node (its most bytes and ops per request)."""
        assert self._limits is not None, "known once a connection is open"
        _, max_ops, max_bytes = self._limits
        return [b[i : i + max_ops]
                for b in batches(items, sizes, min(self._batch_bytes, max_bytes))
                for i in range(0, len(b), max_ops)]

    def _exchange(self, s: socket.socket, frames: Iterable[Frame], count: int,
                  receive: Receive[T], ahead_bytes: int | None = None) -> list[T]:
        """Send the `count` requests over `s` (from `_conn`) and read their answers in order
        (`receive(sock, i)` for request i), sending ahead of the answers read at most
        `ahead_bytes` of request heads (None: every request first, for writes, whose answers
        are a few bytes each)."""
        out: list[T] = []
        unread: deque[int] = deque()  # head bytes of the requests sent but not answered yet
        try:
            for frame in frames:
                head = parts_of(frame[0])[0].nbytes
                while ahead_bytes is not None and unread and sum(unread) + head > ahead_bytes:
                    out.append(receive(s, len(out)))
                    unread.popleft()
                send_parts(s, [p for data in frame for p in parts_of(data)])
                unread.append(head)
            while len(out) < count:
                out.append(receive(s, len(out)))
        except _Refused as e:
            # Answers of later requests may be unread: the connection is not reused.
            s.close()
            raise TransportError(f"node refused: {e}") from None
        except (OSError, struct.error, ConnectionError) as e:
            s.close()
            raise TransportError(f"tcp request to {self._addr} failed: {e}") from e
        except BaseException:
            # A frame given up half sent (a failed hash, an interrupt): the stream is lost.
            s.close()
            raise
        self._release(s)
        return out

    def _release(self, s: socket.socket) -> None:
        """Back to the pool, for the next call (closed once the transport is)."""
        if self._closed:
            s.close()
        else:
            self._pool.put(s)

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """The parts of each op go onto the wire as they are (sendmsg gathers them), taken
        from the op only when its batch goes out; every batch is sent before the first answer
        is read. An object larger than the node takes is refused here, before anything is
        sent (TransportError with the node's limit)."""
        s = self._conn()
        assert self._limits is not None, "_conn learned them"
        largest = self._limits[0]
        for grant, _ in ops:
            if grant.length > largest:
                self._release(s)
                raise TransportError(f"object of {grant.length} bytes exceeds node "
                                     f"{self._addr[0]}:{self._addr[1]}'s max_object_bytes "
                                     f"{largest}")
        groups = self._batches(ops, [g.length for g, _ in ops])

        def frames() -> Iterator[Frame]:
            for batch in groups:
                head = REQ.pack(MAGIC, OP_WRITE, len(batch), 0) + b"".join(
                    GRANT.pack(g.offset, g.length, g.epoch, g.token, g.expires_unix_ms, g.mac)
                    for g, _ in batch)
                frame: Frame = [head]
                for grant, data in batch:
                    parts = parts_of(data)  # waits for a header whose checksum is pending
                    n = sum(p.nbytes for p in parts)
                    if n != grant.length:
                        raise TransportError(f"{n} bytes to write under a grant of "
                                             f"{grant.length}")
                    frame.extend(parts)
                yield frame

        def acked(sock: socket.socket, i: int) -> None:
            _, length = _answer(sock)
            drain(sock, length)

        self._exchange(s, frames(), len(groups), acked)

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        s = self._conn()
        groups = self._batches(ops, [n for _, n in ops])
        frames: list[Frame] = [
            [REQ.pack(MAGIC, OP_READ, len(b), self._epoch) + b"".join(OP.pack(o, n)
                                                                    for o, n in b)]
            for b in groups]

        def body(sock: socket.socket, i: int) -> bytearray:
            return recv_exact(sock, _answer(sock)[1])

        out: list[bytes] = []
        for group, data in zip(groups, self._exchange(s, frames, len(frames), body,
                                                      _READ_AHEAD_BYTES), strict=True):
            if len(data) != sum(n for _, n in group):
                raise TransportError(f"tcp peer answered {len(data)} bytes for a read of "
                                     f"{sum(n for _, n in group)}")
            view, pos = memoryview(data), 0
            for _, n in group:
                out.append(bytes(view[pos : pos + n]))
                pos += n
        return out

    def read_into(self, ops: Sequence[ReadInto], landed: Landed | None = None) -> None:
        """recv_into the caller's views: the kernel's copy out of the socket is the only one."""
        s = self._conn()
        sized = [(off, views, sum(v.nbytes for v in views), j)
                 for j, (off, views) in enumerate(ops)]
        groups = self._batches(sized, [n for _, _, n, _ in sized])
        frames: list[Frame] = [
            [REQ.pack(MAGIC, OP_READ, len(b), self._epoch) + b"".join(OP.pack(o, n)
                                                                    for o, _, n, _ in b)]
            for b in groups]

        def land(sock: socket.socket, i: int) -> None:
            length = _answer(sock)[1]
            want = sum(n for _, _, n, _ in groups[i])
            if length != want:
                raise TransportError(f"tcp peer answered {length} bytes for a read of {want}")
            for _, views, _, j in groups[i]:
                for v in views:
                    recv_into(sock, v)
                if landed is not None:
                    landed(j)

        self._exchange(s, frames, len(frames), land, _READ_AHEAD_BYTES)

    def read_ssd_into(self, ops: Sequence[tuple[str, Sequence[memoryview]]]) -> list[bool]:
        """Objects of the node's SSD tier by key, each straight into its views (their sizes
        add up to the object's length): True per object received, False for a miss (the
        node's file gone, of another length, or damaged). Refused like `read`."""
        s = self._conn()
        sized = [(key, views, sum(v.nbytes for v in views)) for key, views in ops]
        groups = self._batches(sized, [n for _, _, n in sized])
        frames: list[Frame] = []
        for b in groups:
            names = [k.encode("ascii") for k, _, _ in b]
            frames.append([REQ.pack(MAGIC, OP_SSD_READ, len(b), self._epoch)
                           + b"".join(SSD_OP.pack(n, len(k)) for k, (_, _, n) in
                                      zip(names, b, strict=True))
                           + b"".join(names)])

        def land(sock: socket.socket, i: int) -> list[bool]:
            got: list[bool] = []
            for _, views, n in groups[i]:
                status, length = _answer(sock)
                if status == OK and length == n:
                    for v in views:
                        recv_into(sock, v)
                    got.append(True)
                else:
                    drain(sock, length)
                    got.append(False)
            return got

        return [ok for group in self._exchange(s, frames, len(frames), land,
                                               _READ_AHEAD_BYTES)
                for ok in group]

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return
