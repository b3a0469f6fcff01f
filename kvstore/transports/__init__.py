"""Data-path transports between a client and one storage node.

Every transport moves raw bytes at (offset, length) of a node's segment; which objects live
where is the master's business. Failures raise TransportError and the client turns them into
misses (reads) or not-stored (writes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvstore.errors import KVStoreError

# The two operations every transport carries, as the node's metrics label them.
READ, WRITE = "read", "write"


class TransportError(KVStoreError):
    """A read or write to a node failed (node gone, timeout, out of range)."""


class Transport(Protocol):
    name: str

    def write(self, ops: Sequence[tuple[int, bytes | memoryview]]) -> None: ...
    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]: ...
    def close(self) -> None: ...
