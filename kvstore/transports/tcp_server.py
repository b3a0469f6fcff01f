"""The node's side of the bulk TCP transport (framing in `tcp_frames`): a thread per connection.

The node receives written bytes straight into its segment and sends read bytes straight out of
it (one gathered sendmsg per answer), so each direction is one copy on either side of the
socket. Objects on the node's SSD tier are served too (op 3, by key): each file is read into
one buffer the connection reuses, checked there (a damaged file is deleted and a miss), and
sent from it. Every declared size is checked before the node allocates or receives anything: a
refused write's bytes are drained through one small buffer, and a request too large to drain
closes the connection.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from kvstore.auth import MAX_TOKEN_BYTES, UNAUTHENTICATED, token_matches
from kvstore.errors import InvalidKeyError
from kvstore.grants import WriteGrant
from kvstore.limits import MAX_KEY_CHARS, check_key
from kvstore.transports import READ, WRITE
from kvstore.transports.tcp_frames import (
    AUTH,
    AUTH_MAGIC,
    ERROR,
    GRANT,
    LIMITS,
    MAGIC,
    MAX_OPS,
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

log = logging.getLogger(__name__)


class NodeGuard(Protocol):
    """What the TCP server asks of its node: the segment, the limits, who may write/read, and
    its SSD tier's objects."""

    @property
    def segment_view(self) -> memoryview: ...
    @property
    def limits(self) -> tuple[int, int, int]: ...  # max object, ops and bytes per request
    def write_refusal(self, grant: WriteGrant, nbytes: int) -> str | None: ...
    def read_refusal(self, epoch: int) -> str | None: ...
    def read_ssd(self, key: str, length: int, buffer: memoryview) -> memoryview | None:
        """The checked object of `key` on the SSD tier read into `buffer` (exactly `length`
        bytes); None for a miss."""


class TcpServer:
    """Serves one node's segment (and SSD tier) to TCP clients, a thread per connection.

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

    def _check_sizes(self, sizes: Sequence[int]) -> str | None:
        if len(sizes) > self._max_ops:
            return f"{len(sizes)} ops in one request; max_ops_per_request is {self._max_ops}"
        total = sum(sizes)
        if total > self._max_bytes:
            return f"{total} bytes in one request; max_request_bytes is {self._max_bytes}"
        for n in sizes:
            if n > self._max:
                return f"object of {n} bytes exceeds max_object_bytes {self._max}"
        return None

    def _check(self, ops: Sequence[tuple[int, int]]) -> str | None:
        err = self._check_sizes([n for _, n in ops])
        if err:
            return err
        for off, n in ops:
            if off + n > self._segment.nbytes:
                return f"range [{off}, {off + n}) outside segment of {self._segment.nbytes} bytes"
        return None

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._handshake(conn):
                return
            # The connection's buffer for SSD objects, grown to the largest asked.
            scratch = [bytearray()]
            while self._serve_one(conn, scratch):
                pass
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        """Whether the connection presented the token; an unauthenticated one learns only that."""
        head = conn.recv(AUTH.size, socket.MSG_WAITALL)
        if len(head) < AUTH.size:
            return False
        magic, n = AUTH.unpack(head)
        if magic != AUTH_MAGIC or n > MAX_TOKEN_BYTES:
            return False
        ok = token_matches(self._token, bytes(recv_exact(conn, n)))
        self._reply(conn, None if ok else UNAUTHENTICATED, [])
        return ok

    def _serve_one(self, conn: socket.socket, scratch: list[bytearray]) -> bool:
        """One request; False when the connection is to be dropped."""
        head = conn.recv(REQ.size, socket.MSG_WAITALL)
        if len(head) < REQ.size:
            return False
        magic, op, count, epoch = REQ.unpack(head)
        if (magic != MAGIC or op not in (OP_READ, OP_WRITE, OP_SSD_READ, OP_LIMITS)
                or count > MAX_OPS):
            return False  # not our protocol: drop the connection rather than guess
        if op == OP_LIMITS:
            # What a client must split its requests to: it asks with its handshake.
            if count:
                return False
            self._reply(conn, None, [memoryview(LIMITS.pack(self._max, self._max_ops,
                                                            self._max_bytes))])
            return True
        if op == OP_READ:
            raw = recv_exact(conn, count * OP.size)
            ops = [OP.unpack_from(raw, i * OP.size) for i in range(count)]
            err = self._check(ops) or self._node.read_refusal(epoch)
            self._record(READ, 0 if err else sum(n for _, n in ops))
            self._reply(conn, err, [] if err else [self._segment[o : o + n] for o, n in ops])
            return True
        if op == OP_SSD_READ:
            return self._serve_ssd(conn, count, epoch, scratch)
        raw = recv_exact(conn, count * GRANT.size)
        grants = [WriteGrant(*GRANT.unpack_from(raw, i * GRANT.size)) for i in range(count)]
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
            drain(conn, declared)
        else:
            for off, n in sizes:
                recv_into(conn, self._segment[off : off + n])
        # Counted before the reply, so a client that has its answer sees the count.
        self._record(WRITE, 0 if err else declared)
        self._reply(conn, err, [])
        return True

    def _serve_ssd(self, conn: socket.socket, count: int, epoch: int,
                   scratch: list[bytearray]) -> bool:
        """Objects of the SSD tier by key: refused as a whole (one error answer), or answered
        one response per op, each object checked by the tier before it is sent."""
        raw = recv_exact(conn, count * SSD_OP.size)
        table = [SSD_OP.unpack_from(raw, i * SSD_OP.size) for i in range(count)]
        if any(klen > MAX_KEY_CHARS for _, klen in table):
            return False  # no key is that long: not a client of ours
        names = bytes(recv_exact(conn, sum(klen for _, klen in table)))
        keys: list[str] = []
        err = self._check_sizes([n for n, _ in table]) or self._node.read_refusal(epoch)
        pos = 0
        for i, (_, klen) in enumerate(table):
            key = names[pos : pos + klen].decode("ascii", errors="replace")
            pos += klen
            try:
                check_key(key, f"ops[{i}].key")
            except InvalidKeyError as e:
                err = err or str(e)
            keys.append(key)
        if err:
            self._record(READ, 0)
            self._reply(conn, err, [])
            return True
        if table:
            # One buffer for the connection, as large as the largest object asked (bounded by
            # max_object_bytes, checked above).
            largest = max(n for n, _ in table)
            if len(scratch[0]) < largest:
                scratch[0] = bytearray(largest)
        buf = memoryview(scratch[0])
        moved = 0
        for i, (key, (n, _)) in enumerate(zip(keys, table, strict=True)):
            got = self._node.read_ssd(key, n, buf[:n])
            moved += 0 if got is None else got.nbytes
            if i == len(keys) - 1:
                # Counted before the last answer goes out, so a client that has its answer
                # sees the count (as for writes).
                self._record(READ, moved)
            if got is None:
                conn.sendall(RESP.pack(MAGIC, MISS, 0))
            else:
                send_parts(conn, [RESP.pack(MAGIC, OK, got.nbytes), got])
        if not keys:
            self._record(READ, 0)
        return True

    @staticmethod
    def _reply(conn: socket.socket, err: str | None, chunks: list[memoryview]) -> None:
        if err:
            body = err.encode()
            conn.sendall(RESP.pack(MAGIC, ERROR, len(body)) + body)
            return
        # Straight from the segment: the kernel's copy into the socket is the only one.
        send_parts(conn, [RESP.pack(MAGIC, OK, sum(c.nbytes for c in chunks)), *chunks])

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
