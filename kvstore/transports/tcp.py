"""Bulk TCP transport: a small framed protocol, data received with recv_into.

gRPC in Python copies every payload several times and tops out well below a plain socket, so
cross-host bulk data goes over this instead when the node offers it.

Handshake, once per connection: "<4sH" magic b"PKA1", token length, then the pool's service
          token (utf-8, empty when the pool has none); answered like a request, and a refused
          connection is closed after the answer.
Request:  "<4sBxxxIQ" magic b"PKT2", op (1 read, 2 write), op count, the node's epoch the
          reads are for (0 for a write); then per op a read's "<QQ" (offset, length) or a
          write's grant "<QQQQQ16s" (offset, length, epoch, token, expiry, mac); a write
          then carries the concatenated bytes.
Response: "<4sBxxxQ" magic, status (0 ok, 1 error), body length; then the body: the
          concatenated bytes of a read, nothing for a write, a utf-8 message for an error.
The node receives written bytes straight into its segment and sends read bytes straight out
of it (one gathered sendmsg per answer); the client sends an object's header and payload as
they are and can receive a read straight into its caller's buffers (`read_into`), so each
direction is one copy on either side of the socket. Every
declared size is checked before the node allocates or receives anything: a refused write's
bytes are drained through one small buffer, and a request too large to drain closes the
connection.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from kvstore.auth import MAX_TOKEN_BYTES, UNAUTHENTICATED, token_matches
from kvstore.grants import MAC_BYTES, WriteGrant
from kvstore.transports import (
    READ,
    WRITE,
    ReadInto,
    TransportError,
    WriteData,
    batches,
    parts_of,
)

log = logging.getLogger(__name__)

MAGIC = b"PKT2"
AUTH_MAGIC = b"PKA1"
_AUTH = struct.Struct("<4sH")
OP_READ, OP_WRITE = 1, 2
_REQ = struct.Struct("<4sBxxxIQ")
_OP = struct.Struct("<QQ")
_GRANT = struct.Struct(f"<QQQQQ{MAC_BYTES}s")
_RESP = struct.Struct("<4sBxxxQ")
# Beyond this many ops a request is not ours to parse at all: the connection is dropped.
_MAX_OPS = 1 << 16
_DRAIN_CHUNK = 64 * 1024
# Linux's IOV_MAX: the most buffers one sendmsg takes.
_IOV_MAX = 1024


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        got += n


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def _send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Every part, in order, gathered into as few sendmsg calls as the kernel allows: a frame's
    header and its payloads leave in one system call, and no part is copied to join them."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV_MAX])
        while sent:
            if sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def _drain(sock: socket.socket, n: int) -> None:
    buf = memoryview(bytearray(min(n, _DRAIN_CHUNK)))
    while n > 0:
        step = min(n, buf.nbytes)
        _recv_into(sock, buf[:step])
        n -= step


class NodeGuard(Protocol):
    """What the TCP server asks of its node: the segment, the limits, and who may write/read."""

    @property
    def segment_view(self) -> memoryview: ...
    @property
    def limits(self) -> tuple[int, int, int]: ...  # max object, ops and bytes per request
    def write_refusal(self, grant: WriteGrant, nbytes: int) -> str | None: ...
    def read_refusal(self, epoch: int) -> str | None: ...


class TcpServer:
    """Serves one node's segment to TCP clients, a thread per connection.

    `record(op, nbytes)` is told of every answered request (READ or WRITE) and the bytes it
    moved, 0 for a refused one.
    """

    def __init__(self, host: str, port: int, node: NodeGuard,
                 record: Callable[[str, int], None], token: str = "") -> None:
        self._node = node
        self._token = token
        self._segment = node.segment_view
        self._max, self._max_ops, self._max_bytes = node.limits
        self._record = record
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-conn",
                             daemon=True).start()

    def _check(self, ops: Sequence[tuple[int, int]]) -> str | None:
        if len(ops) > self._max_ops:
            return f"{len(ops)} ops in one request; max_ops_per_request is {self._max_ops}"
        total = sum(n for _, n in ops)
        if total > self._max_bytes:
            return f"{total} bytes in one request; max_request_bytes is {self._max_bytes}"
        for off, n in ops:
            if n > self._max:
                return f"object of {n} bytes exceeds max_object_bytes {self._max}"
            if off + n > self._segment.nbytes:
                return f"range [{off}, {off + n}) outside segment of {self._segment.nbytes} bytes"
        return None

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._handshake(conn):
                return
            while self._serve_one(conn):
                pass
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        """Whether the connection presented the token; an unauthenticated one learns only that."""
        head = conn.recv(_AUTH.size, socket.MSG_WAITALL)
        if len(head) < _AUTH.size:
            return False
        magic, n = _AUTH.unpack(head)
        if magic != AUTH_MAGIC or n > MAX_TOKEN_BYTES:
            return False
        ok = token_matches(self._token, bytes(_recv_exact(conn, n)))
        self._reply(conn, None if ok else UNAUTHENTICATED, [])
        return ok

    def _serve_one(self, conn: socket.socket) -> bool:
        """One request; False when the connection is to be dropped."""
        head = conn.recv(_REQ.size, socket.MSG_WAITALL)
        if len(head) < _REQ.size:
            return False
        magic, op, count, epoch = _REQ.unpack(head)
        if magic != MAGIC or op not in (OP_READ, OP_WRITE) or count > _MAX_OPS:
            return False  # not our protocol: drop the connection rather than guess
        if op == OP_READ:
            raw = _recv_exact(conn, count * _OP.size)
            ops = [_OP.unpack_from(raw, i * _OP.size) for i in range(count)]
            err = self._check(ops) or self._node.read_refusal(epoch)
            self._record(READ, 0 if err else sum(n for _, n in ops))
            self._reply(conn, err, [] if err else [self._segment[o : o + n] for o, n in ops])
            return True
        raw = _recv_exact(conn, count * _GRANT.size)
        grants = [WriteGrant(*_GRANT.unpack_from(raw, i * _GRANT.size)) for i in range(count)]
        sizes = [(g.offset, g.length) for g in grants]
        err = self._check(sizes)
        for g in grants:
            err = err or self._node.write_refusal(g, g.length)
        declared = sum(n for _, n in sizes)
        if err is not None:
            if declared > self._max_bytes:
                # Too much to drain: answer, then drop the connection unread.
                self._record(WRITE, 0)
                self._reply(conn, err, [])
                return False
            # The refused bytes are drained through one small buffer to keep the stream framed.
            _drain(conn, declared)
        else:
            for off, n in sizes:
                _recv_into(conn, self._segment[off : off + n])
        # Counted before the reply, so a client that has its answer sees the count.
        self._record(WRITE, 0 if err else declared)
        self._reply(conn, err, [])
        return True
    @staticmethod
    def _reply(conn: socket.socket, err: str | None, chunks: list[memoryview]) -> None:
        if err:
            body = err.encode()
            conn.sendall(_RESP.pack(MAGIC, 1, len(body)) + body)
            return
        # Straight from the segment: the kernel's copy into the socket is the only one.
        _send_parts(conn, [_RESP.pack(MAGIC, 0, sum(c.nbytes for c in chunks)), *chunks])

    def close(self) -> None:
        self._stop.set()
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown does.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)


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
            s.sendall(_AUTH.pack(AUTH_MAGIC, len(self._token)) + self._token)
            magic, status, length = _RESP.unpack(_recv_exact(s, _RESP.size))
            body = _recv_exact(s, length) if magic == MAGIC else b""
        except (OSError, struct.error) as e:
            s.close()
            raise TransportError(f"tcp handshake with {self._addr} failed: {e}") from e
        if magic != MAGIC or status != 0:
            s.close()
            raise TransportError(f"node refused: {body.decode(errors='replace')}")
        return s

    def _call(self, head: bytes, payloads: Sequence[memoryview] = (),
              into: Sequence[memoryview] | None = None) -> bytearray:
        """One request; its answer's body, or, with `into`, the body received straight into
        those views (their sizes must add up to it) and an empty bytearray."""
        s = self._conn()
        try:
            _send_parts(s, [head, *payloads])
            magic, status, length = _RESP.unpack(_recv_exact(s, _RESP.size))
            if magic != MAGIC:
                raise TransportError("tcp peer answered with a bad frame")
            if into is not None and status == 0:
                if length != sum(v.nbytes for v in into):
                    raise TransportError(f"tcp peer answered {length} bytes for a read of "
                                         f"{sum(v.nbytes for v in into)}")
                for v in into:
                    _recv_into(s, v)
                body = bytearray()
            else:
                body = _recv_exact(s, length)
        except (OSError, struct.error) as e:
            s.close()
            raise TransportError(f"tcp request to {self._addr} failed: {e}") from e
        except TransportError:
            s.close()
            raise
        if self._closed:
            s.close()
        else:
            self._pool.put(s)
        if status != 0:
            raise TransportError(f"node refused: {body.decode(errors='replace')}")
        return body

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """The parts of each op go onto the wire as they are (sendmsg gathers them)."""
        pairs = [(g, parts_of(d)) for g, d in ops]
        sizes = [sum(p.nbytes for p in parts) for _, parts in pairs]
        for (grant, _), n in zip(pairs, sizes, strict=True):
            if n != grant.length:
                raise TransportError(f"{n} bytes to write under a grant of {grant.length}")
        for batch in batches(pairs, sizes, self._batch_bytes):
            head = _REQ.pack(MAGIC, OP_WRITE, len(batch), 0) + b"".join(
                _GRANT.pack(g.offset, g.length, g.epoch, g.token, g.expires_unix_ms, g.mac)
                for g, _ in batch)
            self._call(head, [p for _, parts in batch for p in parts])

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes] = []
        for batch in batches(ops, [n for _, n in ops], self._batch_bytes):
            head = _REQ.pack(MAGIC, OP_READ, len(batch), self._epoch) + b"".join(
                _OP.pack(o, n) for o, n in batch)
            body = memoryview(self._call(head))
            pos = 0
            for _, n in batch:
                out.append(bytes(body[pos : pos + n]))
                pos += n
        return out

    def read_into(self, ops: Sequence[ReadInto]) -> None:
        """recv_into the caller's views: the kernel's copy out of the socket is the only one."""
        sized = [(off, views, sum(v.nbytes for v in views)) for off, views in ops]
        for batch in batches(sized, [n for _, _, n in sized], self._batch_bytes):
            head = _REQ.pack(MAGIC, OP_READ, len(batch), self._epoch) + b"".join(
                _OP.pack(o, n) for o, _, n in batch)
            self._call(head, into=[v for _, views, _ in batch for v in views])

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return
