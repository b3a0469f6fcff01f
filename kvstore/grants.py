"""Write grants: the master's permission to write one allocation, checked by the node.

The master hands a writer a grant for exactly the slot it allocated: (epoch, offset, length,
token, expiry), authenticated with an HMAC under a key it gives the node when the node
registers. The node accepts a write over TCP or gRPC only under a valid grant of its current
epoch, so a write can land only inside a live allocation, and a registration that ends (a node
dropped, restarted or re-registered) voids every grant of the one before.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from dataclasses import dataclass

GRANT_KEY_BYTES = 32
MAC_BYTES = 16
_SIGNED = struct.Struct("<QQQQQ")


def new_grant_key() -> bytes:
    return secrets.token_bytes(GRANT_KEY_BYTES)


@dataclass(frozen=True)
class WriteGrant:
    offset: int
    length: int
    epoch: int
    token: int
    expires_unix_ms: int
    mac: bytes = b""


def _mac(key: bytes, g: WriteGrant) -> bytes:
    msg = _SIGNED.pack(g.offset, g.length, g.epoch, g.token, g.expires_unix_ms)
    return hmac.new(key, msg, hashlib.sha256).digest()[:MAC_BYTES]


def sign(key: bytes, offset: int, length: int, epoch: int, token: int,
         expires_unix_ms: int) -> WriteGrant:
    g = WriteGrant(offset, length, epoch, token, expires_unix_ms)
    return WriteGrant(offset, length, epoch, token, expires_unix_ms, _mac(key, g))


def refusal(key: bytes, epoch: int, g: WriteGrant, nbytes: int,
            now_unix_ms: int | None = None) -> str | None:
    """Why a write of `nbytes` under `g` is refused by the node of `epoch`; None to accept."""
    if not key or not hmac.compare_digest(_mac(key, g), g.mac):
        return "write grant is not valid for this node"
    if g.epoch != epoch:
        return f"write grant is for epoch {g.epoch}; this node is in epoch {epoch}"
    if nbytes != g.length:
        return f"write of {nbytes} bytes under a grant of {g.length}"
    now = int(time.time() * 1000) if now_unix_ms is None else now_unix_ms
    if now >= g.expires_unix_ms:
        return "write grant expired (the put was reclaimed)"
    return None
