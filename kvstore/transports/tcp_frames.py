"""The bulk TCP transport's framing, shared by its server (`tcp_server`) and client (`tcp`).

gRPC in Python copies every payload several times and tops out well below a plain socket, so
cross-host bulk data goes over this instead when the node offers it.

Handshake, once per connection: "<4sH" magic b"PKA1", token length, then the pool's service
          token (utf-8, empty when the pool has none); answered like a request, and a refused
          connection is closed after the answer.
Request:  "<4sBxxxIQ" magic b"PKT2", op (1 read, 2 write, 3 ssd read, 4 limits), op count,
          the node's epoch the reads are for (0 for a write); then per op a read's "<QQ"
          (offset, length), a write's grant "<QQQQQ16s" (offset, length, epoch, token, expiry,
          mac), or an ssd read's "<QH" (the object's length, key length) and the key (ascii);
          a write then carries the concatenated bytes. A limits request has no ops.
Response: "<4sBxxxQ" magic, status (0 ok, 1 error, 2 miss), body length; then the body: the
          concatenated bytes of a read, nothing for a write, a utf-8 message for an error, and
          for limits "<QQQ": the node's largest object, most ops and most bytes per request
          (a client sends it with its handshake and splits its requests to fit, so the node
          never has to refuse, and drop, a write too large to drain). An
          ssd read that is not refused as a whole is answered with one response per op, in
          order: the object's bytes (status 0), or status 2 and no body when the node's file
          is gone, of another length or fails its check (the node deletes a damaged file).

Requests on one connection are answered in order, so a client may send several before it
reads the first answer (the node reads a request only once it answered the one before).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from kvstore.grants import MAC_BYTES

MAGIC = b"PKT2"
AUTH_MAGIC = b"PKA1"
AUTH = struct.Struct("<4sH")
OP_READ, OP_WRITE, OP_SSD_READ, OP_LIMITS = 1, 2, 3, 4
REQ = struct.Struct("<4sBxxxIQ")
OP = struct.Struct("<QQ")
GRANT = struct.Struct(f"<QQQQQ{MAC_BYTES}s")
SSD_OP = struct.Struct("<QH")
RESP = struct.Struct("<4sBxxxQ")
LIMITS = struct.Struct("<QQQ")
OK, ERROR, MISS = 0, 1, 2
# Beyond this many ops a request is not ours to parse at all: the connection is dropped.
MAX_OPS = 1 << 16
DRAIN_CHUNK = 64 * 1024
# Linux's IOV_MAX: the most buffers one sendmsg takes.
IOV_MAX = 1024


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket (ConnectionError when the peer closes first)."""
    got = 0
    while got < view.nbytes:
        # MSG_WAITALL: a blocking socket (the node's) fills the view in one call instead of
        # one per segment the kernel happens to hold; one with a timeout returns what it has.
        n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        got += n


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return buf


def send_parts(sock: socket.socket, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Every part, in order, gathered into as few sendmsg calls as the kernel allows: a frame's
    header and its payloads leave in one system call, and no part is copied to join them."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + IOV_MAX])
        while sent:
            if sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def drain(sock: socket.socket, n: int) -> None:
    """Read and drop `n` bytes through one small buffer (keeps the stream framed)."""
    buf = memoryview(bytearray(min(n, DRAIN_CHUNK)))
    while n > 0:
        step = min(n, buf.nbytes)
        recv_into(sock, buf[:step])
        n -= step
