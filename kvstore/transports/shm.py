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

from kvstore import hashed_copy
from kvstore.block_object import PendingObject
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
        # The mapping's address, for the C copies (the numpy view that tells it must not stay:
        # a buffer still exported would keep close() from releasing the mapping).
        self._base = hashed_copy.address(self._view)
        self.size = size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise TransportError(f"range [{offset}, {offset + length}) outside the segment")

    @property
    def hashes_writes(self) -> bool:
        """Whether `write` hashes the payloads of objects not hashed yet as it copies them (a
        writer need not hash them ahead)."""
        return hashed_copy.available()

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        """Each part is copied once, straight into the segment. The payloads of objects not
        hashed yet (PendingObject) are hashed as they are copied, all in one GIL-free call
        (kvstore.hashed_copy), and their headers written after."""
        for grant, data in ops:  # every op checked before any byte is written
            nbytes = (data.nbytes if isinstance(data, PendingObject)
                      else sum(p.nbytes for p in parts_of(data)))
            if nbytes != grant.length:
                raise TransportError(f"{nbytes} bytes to write under a grant of {grant.length}")
            self._check(grant.offset, nbytes)
        hashing = [(g, d) for g, d in ops if isinstance(d, PendingObject)
                   and hashed_copy.available() and d.claim()]
        if hashing:
            try:
                digests = hashed_copy.copy(
                    [hashed_copy.address(o.payload) for _, o in hashing],
                    [self._view[g.offset + o.header_bytes : g.offset + g.length]
                     for g, o in hashing], [True] * len(hashing))
            except BaseException as e:
                for _, o in hashing:
                    o.fail(e)
                raise
            for (_, o), digest in zip(hashing, digests, strict=True):
                assert digest is not None
                o.set_checksum(digest)
        copied = {id(o) for _, o in hashing}
        for grant, data in ops:
            # PendingObject.header waits for (or computes) the checksum of one not hashed here.
            parts = ([data.header()] if isinstance(data, PendingObject) and id(data) in copied
                     else parts_of(data))
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

    def read_into(self, ops: Sequence[ReadInto],
                  landed: Landed | None = None) -> list[int] | None:
        """One copy per view, out of the segment: all of them in one GIL-free call that hashes
        each op's last view as it copies (kvstore.hashed_copy), or, where that is not built, one
        numpy memcpy each (None: the caller hashes)."""
        if hashed_copy.available():
            return self._read_hashed(ops)
        for i, (offset, views) in enumerate(ops):
            self._check(offset, sum(v.nbytes for v in views))
            for v in views:
                copy_into(v, self._view[offset : offset + v.nbytes])
                offset += v.nbytes
            if landed is not None:
                landed(i)
        return None

    def _read_hashed(self, ops: Sequence[ReadInto]) -> list[int]:
        sources: list[int] = []
        targets: list[memoryview] = []
        hashed: list[bool] = []
        for offset, views in ops:
            assert views, "a read op lands somewhere"
            self._check(offset, sum(v.nbytes for v in views))
            for v in views:
                sources.append(self._base + offset)
                targets.append(v)
                offset += v.nbytes
            hashed += [False] * (len(views) - 1) + [True]
        digests = hashed_copy.copy(sources, targets, hashed)
        return [d for d in digests if d is not None]

    def close(self) -> None:
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is collected
