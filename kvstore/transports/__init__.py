"""Data-path transports between a client and one storage node.

Every transport moves raw bytes at (offset, length) of a node's segment; which objects live
where is the master's business. Failures raise TransportError and the client turns them into
misses (reads) or not-stored (writes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

from kvstore.errors import KVStoreError
from kvstore.grants import WriteGrant

# The two operations every transport carries, as the node's metrics label them.
READ, WRITE = "read", "write"


class TransportError(KVStoreError):
    """A read or write to a node failed (node gone, timeout, out of range)."""


class Transport(Protocol):
    name: str

    def write(self, ops: Sequence[tuple[WriteGrant, bytes | memoryview]]) -> None:
        """Each op writes exactly grant.length bytes at grant.offset."""
    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes at each (offset, length), of the node's epoch the transport was made
        for: a node in another epoch refuses (TransportError)."""
    def close(self) -> None: ...


T = TypeVar("T")


def batches(ops: Sequence[T], sizes: Sequence[int], limit: int) -> Iterator[list[T]]:
    """Consecutive groups whose total size stays <= limit (a lone oversize op goes alone)."""
    batch: list[T] = []
    total = 0
    for op, size in zip(ops, sizes, strict=True):
        if batch and total + size > limit:
            yield batch
            batch, total = [], 0
        batch.append(op)
        total += size
    if batch:
        yield batch
