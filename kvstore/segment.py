"""A node's DRAM tier: one shared-memory file under /dev/shm, mapped once, unlinked on exit.

multiprocessing.shared_memory is avoided on purpose: its resource tracker unlinks segments
when any process that attached exits, which would pull the segment from under the node.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os

from kvstore.block_object import scan_objects
from kvstore.errors import SegmentError
from kvstore.metadata import HeldObject

log = logging.getLogger(__name__)
_PAGE = mmap.PAGESIZE
# Linux 5.14+: populate (allocate and map) every page of a range writable in one call; the
# constant is missing from Python before 3.13.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class Segment:
    def __init__(self, path: str, size: int, prefault: bool = True) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.view = memoryview(self._mmap)
        if prefault:
            # Every page now, so the first puts do not pay page-fault latency and a too small
            # /dev/shm fails at start rather than mid-write.
            try:
                self._prefault()
            except BaseException:
                self.view.release()
                self._mmap.close()
                os.unlink(path)
                raise
        self._closed = False
        # A process that exits without close() (an exception, sys.exit) must still not leave
        # the file in /dev/shm; signals are turned into a normal exit by the CLI.
        atexit.register(self.close)

    def _prefault(self) -> None:
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE)  # ~2.4x faster than touching each page
            return
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without it; touch the pages below
                raise SegmentError(
                    f"cannot back a {self.size}-byte segment at {self.path}: {e.strerror}; "
                    "give /dev/shm more room or the node fewer --dram-bytes") from e
        for off in range(0, self.size, _PAGE):
            self.view[off] = 0  # a too small /dev/shm raises SIGBUS here

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SegmentError(
                f"range [{offset}, {offset + length}) outside segment of {self.size} bytes"
            )

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = memoryview(data).nbytes
        self._check(offset, n)
        self.view[offset : offset + n] = memoryview(data).cast("B")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.view[offset : offset + length])

    def objects(self) -> list[HeldObject]:
        """The intact objects the segment holds, in offset order (read from their headers)."""
        return [HeldObject(obj.key, offset, length)
                for offset, length, obj in scan_objects(self._mmap)]

    def close(self) -> None:
        """Unmap and unlink; idempotent so signal handlers and atexit may both call it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            # A view is still exported (e.g. an in-flight gRPC reply); the mapping dies with
            # the process, and unlinking below is what matters for /dev/shm hygiene.
            log.debug("segment %s still has exported views at close", self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        log.info("segment %s unlinked", self.path)
