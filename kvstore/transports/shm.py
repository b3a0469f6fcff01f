"""Same-host transport: map the node's segment file and copy with memoryview slicing.

Nothing stands between a same-host client and the segment, so neither grants nor epochs are
checked on this path; what the client reads is checked by the object's own header instead
(key, layout, length, checksum), and the client maps a node's segment again when the node's
epoch changes."""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

from kvstore.grants import WriteGrant
from kvstore.transports import Landed, ReadInto, TransportError, WriteData, parts_of

# Copies up to this size hold the GIL (a few microseconds at most).
_SMALL_COPY = 64 * 1024


def copy_into(dst: memoryview, src: memoryview) -> None:
    """One memcpy, with the GIL released (numpy's copy does; a memoryview slice assignment
    holds it), so reads from several nodes copy in parallel. A small copy (a header) is a
    slice assignment: numpy's per-call setup (about 1 us) would cost more than the memcpy."""
    if dst.nbytes <= _SMALL_COPY and dst.format == src.format == "B" and dst.ndim == 1:
        dst[:] = src
        return
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


class ShmTransport:
    name = "shm"

    def __init__(self, path: str, size: int) -> None:
        """Raises OSError when the file cannot be opened (other mount namespace, permissions)."""
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(f"segment {path} is not {size} bytes")
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)
        self.size = size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise TransportError(f"range [{offset}, {offset + length}) outside the segment")

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """Each part is copied once, straight into the segment."""
        for grant, data in ops:
            parts = parts_of(data)
            nbytes = sum(p.nbytes for p in parts)
            if nbytes != grant.length:
                raise TransportError(f"{nbytes} bytes to write under a grant of {grant.length}")
            self._check(grant.offset, nbytes)
            pos = grant.offset
            for p in parts:
                copy_into(self._view[pos : pos + p.nbytes], p)
                pos += p.nbytes

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        for offset, length in ops:
            self._check(offset, length)
            out.append(bytes(self._view[offset : offset + length]))
        return out

    def read_into(self, ops: Sequence[ReadInto], landed: Landed | None = None) -> None:
        """One memcpy per view, out of the segment."""
        for i, (offset, views) in enumerate(ops):
            self._check(offset, sum(v.nbytes for v in views))
            for v in views:
                copy_into(v, self._view[offset : offset + v.nbytes])
                offset += v.nbytes
            if landed is not None:
                landed(i)

    def close(self) -> None:
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is collected
