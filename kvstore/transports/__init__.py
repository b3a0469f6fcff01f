"""Data-path transports between a client and one storage node.

Every transport moves raw bytes at (offset, length) of a node's segment; which objects live
where is the master's business. Failures raise TransportError and the client turns them into
misses (reads) or not-stored (writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from kvstore.errors import KVStoreError
from kvstore.grants import WriteGrant

# The two operations every transport carries, as the node's metrics label them.
READ, WRITE = "read", "write"


class TransportError(KVStoreError):
    """A read or write to a node failed (node gone, timeout, out of range)."""


Buffer = bytes | bytearray | memoryview
# What one write carries: a buffer, or parts written back to back (an object's header and its
# payload, so the payload is never copied to join them).
WriteData = Buffer | Sequence[Buffer]
# One scatter read: the bytes from an offset on, landing in these views in turn.
ReadInto = tuple[int, Sequence[memoryview]]
# Told the index of each read op once all its views are filled, in order, so a caller can
# check an object while the next ones are still arriving.
Landed = Callable[[int], None]


def parts_of(data: WriteData) -> list[memoryview]:
    """The byte views of one write, without copying."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [memoryview(data).cast("B")]
    return [memoryview(p).cast("B") for p in data]


class Transport(Protocol):
    name: str

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """Each op writes exactly grant.length bytes at grant.offset."""
    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes at each (offset, length), of the node's epoch the transport was made
        for: a node in another epoch refuses (TransportError)."""
    def read_into(self, ops: Sequence[ReadInto],
                  landed: Landed | None = None) -> list[int] | None:
        """Each op's views filled, in turn, with the bytes from its offset on (their sizes add
        up to the op's length), with no copy on the way: the caller owns the views; `landed(i)`
        once op i's are. Refused like `read`; a failure may leave views partly written.

        A transport that checksums what it copies (shm, kvstore.hashed_copy) returns instead
        the xxh3-64 of each op's last view as it landed, and never calls `landed`; the others
        return None."""
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
