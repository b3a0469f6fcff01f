"""The client side of the bulk TCP transport (framing in `tcp_frames`, the node's side in
`tcp_server`).

The client sends an object's header and payload as they are and can receive a read straight
into its caller's buffers (`read_into`), so each direction is one copy on either side of the
socket. The requests of one call are pipelined: all of a put's batches go out back to back and
their answers are read after, as the plain socket loop it is measured against streams its
bytes, instead of the link idling for a round trip per batch. Reads are pipelined only as far
as their requests fit in the socket's buffers (the node answers with bulk while it is not
reading), so neither side can wait on the other.
"""

from __future__ import annotations

import queue
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvstore.grants import WriteGrant
from kvstore.transports import ReadInto, TransportError, WriteData, batches, parts_of
from kvstore.transports.tcp_frames import (
    AUTH,
    AUTH_MAGIC,
    GRANT,
    MAGIC,
    MISS,
    OK,
    OP,
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
Frame = list[bytes | bytearray | memoryview]  # one request: its head, then any payload
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
            s.sendall(AUTH.pack(AUTH_MAGIC, len(self._token)) + self._token)
            magic, status, length = RESP.unpack(recv_exact(s, RESP.size))
            body = recv_exact(s, length) if magic == MAGIC else b""
        except (OSError, struct.error) as e:
            s.close()
            raise TransportError(f"tcp handshake with {self._addr} failed: {e}") from e
        if magic != MAGIC or status != 0:
            s.close()
            raise TransportError(f"node refused: {body.decode(errors='replace')}")
        return s

    def _exchange(self, frames: Sequence[Frame], receive: Receive[T],
                  ahead_bytes: int | None = None) -> list[T]:
        """Send the requests and read their answers in order (`receive(sock, i)` for request
        i), sending ahead of the answers read at most `ahead_bytes` of request heads (None:
        every request first, for writes, whose answers are a few bytes each)."""
        s = self._conn()
        out: list[T] = []
        unread: deque[int] = deque()  # head bytes of the requests sent but not answered yet
        try:
            for frame in frames:
                head = memoryview(frame[0]).nbytes
                while ahead_bytes is not None and unread and sum(unread) + head > ahead_bytes:
                    out.append(receive(s, len(out)))
                    unread.popleft()
                send_parts(s, frame)
                unread.append(head)
            while len(out) < len(frames):
                out.append(receive(s, len(out)))
        except _Refused as e:
            # Answers of later requests may be unread: the connection is not reused.
            s.close()
            raise TransportError(f"node refused: {e}") from None
        except (OSError, struct.error, ConnectionError) as e:
            s.close()
            raise TransportError(f"tcp request to {self._addr} failed: {e}") from e
        except TransportError:
            s.close()
            raise
        if self._closed:
            s.close()
        else:
            self._pool.put(s)
        return out

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """The parts of each op go onto the wire as they are (sendmsg gathers them); every
        batch is sent before the first answer is read."""
        pairs = [(g, parts_of(d)) for g, d in ops]
        sizes = [sum(p.nbytes for p in parts) for _, parts in pairs]
        for (grant, _), n in zip(pairs, sizes, strict=True):
            if n != grant.length:
                raise TransportError(f"{n} bytes to write under a grant of {grant.length}")
        frames: list[Frame] = []
        for batch in batches(pairs, sizes, self._batch_bytes):
            head = REQ.pack(MAGIC, OP_WRITE, len(batch), 0) + b"".join(
                GRANT.pack(g.offset, g.length, g.epoch, g.token, g.expires_unix_ms, g.mac)
                for g, _ in batch)
            frames.append([head, *(p for _, parts in batch for p in parts)])

        def acked(sock: socket.socket, i: int) -> None:
            _, length = _answer(sock)
            drain(sock, length)

        self._exchange(frames, acked)

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        groups = list(batches(ops, [n for _, n in ops], self._batch_bytes))
        frames: list[Frame] = [
            [REQ.pack(MAGIC, OP_READ, len(b), self._epoch) + b"".join(OP.pack(o, n)
                                                                    for o, n in b)]
            for b in groups]

        def body(sock: socket.socket, i: int) -> bytearray:
            return recv_exact(sock, _answer(sock)[1])

        out: list[bytes] = []
        for group, data in zip(groups, self._exchange(frames, body, _READ_AHEAD_BYTES),
                               strict=True):
            if len(data) != sum(n for _, n in group):
                raise TransportError(f"tcp peer answered {len(data)} bytes for a read of "
                                     f"{sum(n for _, n in group)}")
            view, pos = memoryview(data), 0
            for _, n in group:
                out.append(bytes(view[pos : pos + n]))
                pos += n
        return out

    def read_into(self, ops: Sequence[ReadInto]) -> None:
        """recv_into the caller's views: the kernel's copy out of the socket is the only one."""
        sized = [(off, views, sum(v.nbytes for v in views)) for off, views in ops]
        groups = list(batches(sized, [n for _, _, n in sized], self._batch_bytes))
        frames: list[Frame] = [
            [REQ.pack(MAGIC, OP_READ, len(b), self._epoch) + b"".join(OP.pack(o, n)
                                                                    for o, _, n in b)]
            for b in groups]

        def land(sock: socket.socket, i: int) -> None:
            length = _answer(sock)[1]
            want = sum(n for _, _, n in groups[i])
            if length != want:
                raise TransportError(f"tcp peer answered {length} bytes for a read of {want}")
            for _, views, _ in groups[i]:
                for v in views:
                    recv_into(sock, v)

        self._exchange(frames, land, _READ_AHEAD_BYTES)

    def read_ssd_into(self, ops: Sequence[tuple[str, Sequence[memoryview]]]) -> list[bool]:
        """Objects of the node's SSD tier by key, each straight into its views (their sizes
        add up to the object's length): True per object received, False for a miss (the
        node's file gone, of another length, or damaged). Refused like `read`."""
        sized = [(key, views, sum(v.nbytes for v in views)) for key, views in ops]
        groups = list(batches(sized, [n for _, _, n in sized], self._batch_bytes))
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

        return [ok for group in self._exchange(frames, land, _READ_AHEAD_BYTES)
                for ok in group]

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return
