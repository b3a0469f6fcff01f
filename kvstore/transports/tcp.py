"""Bulk TCP transport: a small framed protocol, data received with recv_into.

gRPC in Python copies every payload several times and tops out well below a plain socket, so
cross-host bulk data goes over this instead when the node offers it.

Request:  "<4sBxxxI" magic b"PKT1", op (1 read, 2 write), op count; then count x "<QQ"
          (offset, length); a write then carries the concatenated bytes.
Response: "<4sBxxxQ" magic, status (0 ok, 1 error), body length; then the body: the
          concatenated bytes of a read, nothing for a write, a utf-8 message for an error.
The node receives written bytes straight into its segment, so a write is one copy.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from kvstore.transports import READ, WRITE, TransportError

log = logging.getLogger(__name__)

MAGIC = b"PKT1"
OP_READ, OP_WRITE = 1, 2
_REQ = struct.Struct("<4sBxxxI")
_OP = struct.Struct("<QQ")
_RESP = struct.Struct("<4sBxxxQ")
_MAX_OPS = 1 << 16


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


class TcpServer:
    """Serves one segment (a writable memoryview) to TCP clients, a thread per connection.

    `record(op, nbytes)` is told of every answered request (READ or WRITE) and the bytes it
    moved, 0 for a refused one.
    """

    def __init__(self, host: str, port: int, segment: memoryview, max_object_bytes: int,
                 record: Callable[[str, int], None]) -> None:
        self._segment = segment
        self._max = max_object_bytes
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
        for off, n in ops:
            if n > self._max:
                return f"object of {n} bytes exceeds max_object_bytes {self._max}"
            if off + n > self._segment.nbytes:
                return f"range [{off}, {off + n}) outside segment of {self._segment.nbytes} bytes"
        return None

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                head = conn.recv(_REQ.size, socket.MSG_WAITALL)
                if len(head) < _REQ.size:
                    return
                magic, op, count = _REQ.unpack(head)
                if magic != MAGIC or op not in (OP_READ, OP_WRITE) or count > _MAX_OPS:
                    return  # not our protocol: drop the connection rather than guess
                raw = _recv_exact(conn, count * _OP.size)
                ops = [_OP.unpack_from(raw, i * _OP.size) for i in range(count)]
                err = self._check(ops)
                moved = 0 if err else sum(n for _, n in ops)
                if op == OP_WRITE:
                    for off, n in ops:
                        # On error the bytes must still be drained to keep the stream framed.
                        target = (memoryview(bytearray(n)) if err
                                  else self._segment[off : off + n])
                        _recv_into(conn, target)
                    # Counted before the reply, so a client that has its answer sees the count.
                    self._record(WRITE, moved)
                    self._reply(conn, err, [])
                else:
                    self._record(READ, moved)
                    self._reply(conn, err, [] if err else
                                [self._segment[o : o + n] for o, n in ops])
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _reply(conn: socket.socket, err: str | None, chunks: list[memoryview]) -> None:
        if err:
            body = err.encode()
            conn.sendall(_RESP.pack(MAGIC, 1, len(body)) + body)
            return
        conn.sendall(_RESP.pack(MAGIC, 0, sum(c.nbytes for c in chunks)))
        for c in chunks:
            conn.sendall(c)

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

    def __init__(self, address: str, timeout_s: float) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host, int(port))
        self._timeout = timeout_s
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
        return s

    def _call(self, op: int, ops: Sequence[tuple[int, int]],
              payloads: Sequence[bytes | memoryview] = ()) -> bytearray:
        s = self._conn()
        try:
            s.sendall(_REQ.pack(MAGIC, op, len(ops)) + b"".join(_OP.pack(o, n) for o, n in ops))
            for p in payloads:
                s.sendall(p)
            magic, status, length = _RESP.unpack(_recv_exact(s, _RESP.size))
            if magic != MAGIC:
                raise TransportError("tcp peer answered with a bad frame")
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

    def write(self, ops: Sequence[tuple[int, bytes | memoryview]]) -> None:
        views = [memoryview(d).cast("B") for _, d in ops]
        self._call(OP_WRITE, [(o, v.nbytes) for (o, _), v in zip(ops, views, strict=True)],
                   views)

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        body = memoryview(self._call(OP_READ, ops))
        out, pos = [], 0
        for _, n in ops:
            out.append(bytes(body[pos : pos + n]))
            pos += n
        return out

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return
