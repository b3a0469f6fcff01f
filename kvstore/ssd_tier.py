"""A node's SSD tier: one file per object under `--ssd-dir`, its own LRU and watermarks.

A file holds the object exactly as it is stored in DRAM (`kvstore.block_object`: the header
names its key and lengths, a checksum covers the payload), so a node restarted on the same
directory re-indexes it from the headers alone, and every read is checked before it counts as a
hit: a damaged file is a miss, deleted and counted, never returned.

Files are written under a temporary name, flushed to the device (file, then the directory
entry after the rename; `fsync=False` skips both) and renamed, so neither a crash nor a power
loss leaves half an object under a key's name; temporary files left by a crash are removed at
start. One node owns a
directory at a time (an flock on `.lock`). The tier never calls the master: what it stored and
what it dropped are drained by the node and reported in its next heartbeat.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvstore.block_object import (
    HEADER_PEEK_BYTES,
    ObjectHeader,
    Rejection,
    check_object,
    peek_header,
)
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

_SUFFIX = ".pkv"
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"
# A key is used as its file name when it is one path component that is neither hidden nor
# special; any other key (with '/', a leading '.', too long for NAME_MAX) is named by its
# sha256 under a '~' prefix, a character the key syntax excludes, so the two never collide.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_=+@:-][A-Za-z0-9._=+@:-]{0,199}")
_HASHED_PREFIX = "~"
# Bytes read at start to learn a file's header; most headers fit, longer ones get a 2nd read.
_FIRST_READ = 4096


class SsdDirInUseError(KVStoreError):
    """Another live node holds the SSD directory's lock."""


class Spill(enum.Enum):
    """What became of one request to store an object on the SSD tier."""

    STORED = "stored"
    EXISTS = "exists"          # the tier already holds the key
    INVALID = "invalid"        # the bytes are not an intact object of that key: nothing stored
    FULL = "full"              # larger than the tier, or no LRU file left to make room
    IO_ERROR = "io_error"      # the file system refused (ENOSPC, EIO): nothing stored


def file_name(key: str) -> str:
    """The file an object of `key` is stored in, inside the tier's directory."""
    if _PLAIN_NAME.fullmatch(key):
        return key + _SUFFIX
    return _HASHED_PREFIX + hashlib.sha256(key.encode()).hexdigest() + _SUFFIX


def read_object_file(path: str, key: str, buffer: memoryview | None = None
                     ) -> tuple[memoryview, int] | Rejection | None:
    """The object of `key` in the file at `path`, read into `buffer` (a fresh buffer when None)
    and checked: (the object's bytes, a view of `buffer`, and their count). A Rejection when
    the file holds anything but an intact object of `key`; None when there is no such file.

    A same-host client calls this on a node's directory too: reading straight into its own
    buffer, it needs neither the node nor a copy."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below; FileIO.readinto
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if buffer is None:
            buffer = memoryview(bytearray(size))
        if buffer.nbytes < size:
            return Rejection.LENGTH
        dest = buffer.cast("B")[:size]
        got = 0
        while got < size:
            n = f.readinto(dest[got:])
            if not n:
                return Rejection.LENGTH  # truncated under us
            got += n
    checked = check_object(dest, key)
    if isinstance(checked, Rejection):
        return checked
    return dest, size


@dataclass(frozen=True)
class SsdStats:
    capacity_bytes: int
    used_bytes: int
    objects: int
    hits: int
    misses: int
    spills: dict[str, int]  # by Spill value
    evictions: int
    corrupted: int  # files found damaged (at start or on read) and deleted


class SsdTier:
    def __init__(self, directory: str, capacity_bytes: int, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, fsync: bool = True) -> None:
        assert capacity_bytes > 0 and 0 < low_watermark <= high_watermark <= 1, \
            "NodeConfig validates the SSD tier's settings"
        self.directory = os.path.abspath(directory)
        self.capacity_bytes = capacity_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.fsync = fsync
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.directory, _LOCK_NAME),
                                os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SsdDirInUseError(
                f"ssd_dir {self.directory} is in use by another node; give each node its "
                "own --ssd-dir") from None
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._lock = threading.Lock()
        # key -> object bytes, least recently used first.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        # Keys whose file went away (evicted, found damaged, removed) since the last drain.
        self._dropped: list[str] = []
        self._tmp_names = itertools.count()
        self.hits = self.misses = self.evictions = self.corrupted = 0
        self.spills: dict[Spill, int] = dict.fromkeys(Spill, 0)
        self._closed = False
        self._scan()

    # ---- start ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the files a previous run left, oldest modified first (the LRU order survives a
        restart only approximately); remove temporary and damaged ones."""
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.directory):
            if entry.name == _LOCK_NAME or not entry.is_file(follow_symlinks=False):
                continue
            if entry.name.startswith(_TMP_PREFIX):
                log.info("removing %s, left half-written by a node that stopped", entry.path)
                self._unlink(entry.name)
                continue
            header = self._read_header(entry.path)
            size = entry.stat(follow_symlinks=False).st_size
            if (header is None or file_name(header.key) != entry.name
                    or header.total_bytes != size):
                log.warning("removing %s: not an object file of this tier", entry.path)
                self.corrupted += 1
                self._unlink(entry.name)
                continue
            found.append((entry.stat().st_mtime, header.key, size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._used += size
        self._enforce_watermark(exclude=None)
        if found:
            log.info("SSD tier %s: %d objects (%d bytes) found from a previous run",
                     self.directory, len(self._lru), self._used)
        # What a restart re-indexed is reported at registration, not as drops.
        self._dropped.clear()

    @staticmethod
    def _read_header(path: str) -> ObjectHeader | None:
        try:
            with open(path, "rb") as f:
                head = f.read(_FIRST_READ)
                got = peek_header(head)
                if isinstance(got, int) and got > len(head) and len(head) >= HEADER_PEEK_BYTES:
                    head += f.read(got - len(head))
                    got = peek_header(head)
        except OSError:
            return None
        return got if isinstance(got, ObjectHeader) else None

    # ---- what it holds ----------------------------------------------------------------------

    def path(self, key: str) -> str:
        return os.path.join(self.directory, file_name(key))

    def held(self) -> list[tuple[str, int]]:
        """(key, object bytes) of every file, least recently used first."""
        with self._lock:
            return list(self._lru.items())

    def size_of(self, key: str) -> int | None:
        with self._lock:
            return self._lru.get(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    @property
    def used_bytes(self) -> int:
        return self._used

    def stats(self) -> SsdStats:
        with self._lock:
            return SsdStats(self.capacity_bytes, self._used, len(self._lru), self.hits,
                            self.misses, {s.value: n for s, n in self.spills.items()},
                            self.evictions, self.corrupted)

    def drain_dropped(self) -> list[str]:
        """Keys whose file is gone since the last call (to report to the master)."""
        with self._lock:
            out, self._dropped = self._dropped, []
            return out

    def restore_dropped(self, keys: list[str]) -> None:
        """Put back keys drained but not delivered (the heartbeat carrying them failed)."""
        with self._lock:
            self._dropped[:0] = keys

    # ---- writing ----------------------------------------------------------------------------

    def spill(self, key: str, data: bytes | memoryview) -> Spill:
        """Store `data`, which must be an intact object of `key` (checked first), as the file
        of `key`; then bring the tier under its high watermark, least recently used first.

        The caller passes bytes nobody else may change meanwhile (the node copies a slot out
        of its segment first): what is checked is what is written."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._count(Spill.EXISTS)
        if isinstance(check_object(view, key), Rejection):
            return self._count(Spill.INVALID)
        with self._lock:
            if n > self.capacity_bytes or not self._make_room(n):
                return self._count(Spill.FULL)
            # Reserve the bytes now so concurrent spills cannot overfill the tier.
            self._used += n
        tmp = f"{_TMP_PREFIX}{os.getpid()}-{next(self._tmp_names)}"
        tmp_path = os.path.join(self.directory, tmp)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                done = 0
                while done < n:
                    done += os.write(fd, view[done:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, self.path(key))
            if self.fsync:
                # The rename itself is durable only once the directory is flushed.
                os.fsync(self._dir_fd)
        except OSError as e:
            log.warning("spill of %s to %s failed: %s", key, self.directory, e)
            self._unlink(tmp)
            with self._lock:
                self._used -= n
                return self._count(Spill.IO_ERROR)
        with self._lock:
            self._lru[key] = n
            self._enforce_watermark(exclude=key)
            return self._count(Spill.STORED)

    def _count(self, outcome: Spill) -> Spill:
        self.spills[outcome] += 1
        return outcome

    def _make_room(self, n: int) -> bool:
        """Evict least recently used files until `n` more bytes fit under the capacity."""
        while self._used + n > self.capacity_bytes and self._lru:
            self._evict_lru()
        return self._used + n <= self.capacity_bytes

    def _enforce_watermark(self, exclude: str | None) -> None:
        if self._used <= self.high_watermark * self.capacity_bytes:
            return
        target = self.low_watermark * self.capacity_bytes
        while self._used > target and self._lru:
            if exclude is not None and next(iter(self._lru)) == exclude:
                if len(self._lru) == 1:
                    break
                self._lru.move_to_end(exclude)
            self._evict_lru()

    def _evict_lru(self) -> None:
        key, _ = next(iter(self._lru.items()))
        self._drop(key)
        self.evictions += 1

    def _drop(self, key: str) -> None:
        """Forget `key` and unlink its file (a reader that has it open keeps reading it)."""
        size = self._lru.pop(key, None)
        if size is None:
            return
        self._used -= size
        self._dropped.append(key)
        self._unlink(file_name(key))

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    def remove(self, key: str) -> bool:
        with self._lock:
            if key not in self._lru:
                return False
            self._drop(key)
            return True

    # ---- reading ----------------------------------------------------------------------------

    def read_into(self, key: str, buffer: memoryview | None = None) -> memoryview | None:
        """The checked object of `key`, read straight into `buffer` (a fresh one when None):
        a view of its first bytes. None for a miss; a file that fails its check is deleted,
        counted, reported as dropped, and a miss."""
        with self._lock:
            size = self._lru.get(key)
            # A buffer too small for the file is the caller's mistake, not damage: a miss.
            if size is None or (buffer is not None and buffer.nbytes < size):
                self.misses += 1
                return None
        got = read_object_file(self.path(key), key, buffer)
        with self._lock:
            if got is None or isinstance(got, Rejection):
                self.misses += 1
                if isinstance(got, Rejection):
                    log.warning("SSD file of %s refused (%s); deleting it", key, got.value)
                    self.corrupted += 1
                    self._drop(key)
                elif key in self._lru:  # gone from the directory under us
                    self._used -= self._lru.pop(key)
                    self._dropped.append(key)
                return None
            self.hits += 1
            if key in self._lru:
                self._lru.move_to_end(key)
            return got[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._dir_fd)
        os.close(self._lock_fd)  # releases the flock
