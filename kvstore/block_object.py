"""The stored object: a self-describing header that names its key and layout, then the payload.

Layout (little-endian), format version 2:
    fixed  "<4sHHHHHIQQ": magic b"PKV1", format version, fingerprint length, dtype length,
           key length, ndim, header length (bytes, multiple of 64), payload length,
           xxh3_64 of the payload
    then   fingerprint (utf-8), dtype (ascii), key (ascii), shape (ndim x u64),
           zero padding to header length
    then   payload

The object records the key it was written for, so bytes that reach a reader under another key
(a slot reused after a lease ran out, a late writer, a node that restarted) are refused, never
returned; a node could also tell from its segment alone which objects it holds.

The header is padded to 64 bytes so the payload of an object placed at an aligned offset is
itself aligned, which lets readers view it as a tensor without a copy.
"""

from __future__ import annotations

import enum
import mmap
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import xxhash

MAGIC = b"PKV1"
FORMAT_VERSION = 2
HEADER_ALIGN = 64
_FIXED = struct.Struct("<4sHHHHHIQQ")
# The payload's checksum is the fixed part's last field.
_CHECKSUM = struct.Struct("<Q")
_CHECKSUM_AT = _FIXED.size - _CHECKSUM.size
_MAX_SHORT = 0xFFFF
# Pool block keys are the hex of a 128-bit xxh3 digest (kvstore.hashing's default algorithm).
BLOCK_KEY_CHARS = 32
# The layout of an object stored as plain bytes (`kvstore put`, callers that state none).
RAW_FINGERPRINT = ""
RAW_DTYPE = "uint8"


@dataclass(frozen=True)
class BlockLayout:
    """What the payload's bytes mean: the producer's layout fingerprint, element type, shape.

    A reader that states the layout it expects gets only objects written with exactly it."""

    fingerprint: str
    dtype: str
    shape: tuple[int, ...]

    @staticmethod
    def raw(nbytes: int) -> BlockLayout:
        return BlockLayout(RAW_FINGERPRINT, RAW_DTYPE, (nbytes,))


@dataclass(frozen=True)
class BlockObject:
    key: str
    fingerprint: str
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview | bytes

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.fingerprint, self.dtype, self.shape)


class Rejection(enum.Enum):
    """Why bytes read for a key are not that key's object (the label of the client's metric)."""

    FORMAT = "format"      # not an object of this format: magic, version or header damaged
    LENGTH = "length"      # the header's lengths do not add up to the bytes read
    KEY = "key"            # an intact object, written for another key
    LAYOUT = "layout"      # an intact object of another layout than the reader expects
    CHECKSUM = "checksum"  # the payload is not what was written


def _header_len(fp_len: int, dtype_len: int, key_len: int, ndim: int) -> int:
    raw = _FIXED.size + fp_len + dtype_len + key_len + 8 * ndim
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def _encode_header(key: str, layout: BlockLayout, payload_nbytes: int, checksum: int) -> bytes:
    fp = layout.fingerprint.encode("utf-8")
    dt = layout.dtype.encode("ascii")
    kb = key.encode("ascii")
    shape = layout.shape
    if max(len(fp), len(dt), len(kb), len(shape)) > _MAX_SHORT:
        raise ValueError("key, fingerprint, dtype and shape must each be shorter than 65536")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape dimensions must be >= 0, got {shape}")
    hlen = _header_len(len(fp), len(dt), len(kb), len(shape))
    head = (
        _FIXED.pack(MAGIC, FORMAT_VERSION, len(fp), len(dt), len(kb), len(shape), hlen,
                    payload_nbytes, checksum)
        + fp + dt + kb
        + struct.pack(f"<{len(shape)}Q", *shape)
    )
    return head + b"\x00" * (hlen - len(head))


def encoded_size(fingerprint: str, dtype: str, shape: tuple[int, ...], payload_nbytes: int,
                 key_chars: int = BLOCK_KEY_CHARS) -> int:
    """Size in bytes of the encoded object, without building it (for allocation)."""
    fp_len = len(fingerprint.encode("utf-8"))
    return (_header_len(fp_len, len(dtype.encode("ascii")), key_chars, len(shape))
            + payload_nbytes)


def encode_object(key: str, layout: BlockLayout, payload: bytes | memoryview) -> bytes:
    header, view = encode_parts(key, layout, payload)
    return header + view


def encode_parts(key: str, layout: BlockLayout,
                 payload: bytes | bytearray | memoryview) -> tuple[bytes, memoryview]:
    """The object as two parts, header and payload, with the payload not copied: transports
    write the parts back to back (scatter-gather), so a put copies the payload only onto the
    wire or into the segment. The caller must not change the payload until it is written."""
    view = memoryview(payload).cast("B")
    return _encode_header(key, layout, view.nbytes, xxhash.xxh3_64_intdigest(view)), view


class PendingObject(Sequence[memoryview]):
    """An object whose payload is still to be hashed: its header is built now (key, layout and
    lengths checked, so a bad one fails before anything is sent) and the checksum written into
    it once, by whoever claims the payload first: a writer's thread hashing ahead of the
    transfers (`compute_checksum`; python-xxhash releases the GIL while it hashes), a transport
    that hashes as it copies (`claim`, then `set_checksum`), or else whoever takes the header.
    As write data it is its two parts, header then payload; taking the header waits for the
    checksum, so no header leaves without it. The payload is not copied; the caller must not
    change it until written."""

    def __init__(self, key: str, layout: BlockLayout,
                 payload: bytes | bytearray | memoryview) -> None:
        self.payload = memoryview(payload).cast("B")
        self._header = bytearray(_encode_header(key, layout, self.payload.nbytes, 0))
        self._claimed = threading.Lock()  # taken, never released, by the one who hashes
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    @property
    def nbytes(self) -> int:
        """The encoded object's size, known before its checksum is."""
        return len(self._header) + self.payload.nbytes

    @property
    def header_bytes(self) -> int:
        return len(self._header)

    def claim(self) -> bool:
        """True for the one caller that is to hash the payload; it must then `set_checksum`
        or `fail`, or the header's takers wait for ever."""
        return self._claimed.acquire(blocking=False)

    def set_checksum(self, digest: int) -> None:
        """The claimer's digest of the payload (as it was written)."""
        _CHECKSUM.pack_into(self._header, _CHECKSUM_AT, digest)
        self._ready.set()

    def fail(self, exc: BaseException) -> None:
        """The claimer could not hash: whoever takes the header gets `exc` raised."""
        self._failed = exc
        self._ready.set()

    def compute_checksum(self) -> None:
        """Hash the payload into the header, unless another has claimed it; a failure is
        raised to whoever takes the header."""
        if not self.claim():
            return
        try:
            self.set_checksum(xxhash.xxh3_64_intdigest(self.payload))
        except BaseException as e:  # raised to the sender, in its thread
            self.fail(e)

    def give_up(self) -> None:
        """For an object that will not be hashed (its put ended first): taking its header
        raises instead of waiting forever. One being hashed is left to finish."""
        if self.claim():
            self.fail(RuntimeError("the put ended before this object's checksum"))

    def header(self) -> memoryview:
        self.compute_checksum()  # nobody has: this taker hashes it
        self._ready.wait()
        if self._failed is not None:
            raise self._failed
        return memoryview(self._header)

    def __len__(self) -> int:
        return 2

    @overload
    def __getitem__(self, i: int) -> memoryview: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[memoryview]: ...

    def __getitem__(self, i: int | slice) -> memoryview | Sequence[memoryview]:
        if isinstance(i, slice):
            return [self.header(), self.payload][i]
        if i in (0, -2):
            return self.header()
        if i in (1, -1):
            return self.payload
        raise IndexError(i)


def header_size(key: str, layout: BlockLayout) -> int:
    """Bytes of the header of the object `key` stored with `layout` (a multiple of 64): a
    reader that knows both knows where the payload starts before reading anything."""
    return _header_len(len(layout.fingerprint.encode("utf-8")), len(layout.dtype.encode("ascii")),
                       len(key.encode("ascii")), len(layout.shape))


def encode_block(fingerprint: str, dtype: str, shape: tuple[int, ...],
                 payload: bytes | memoryview, *, key: str) -> bytes:
    return encode_object(key, BlockLayout(fingerprint, dtype, tuple(shape)), payload)


def check_object(data: bytes | memoryview, key: str | None,
                 layout: BlockLayout | None = None) -> BlockObject | Rejection:
    """The object in `data` when it is exactly an intact object written for `key` (any key when
    None) with `layout` (any when None); otherwise why not. The payload is a view into `data`.

    The cheap checks come first, so bytes of another key are refused without hashing them."""
    view = memoryview(data).cast("B")
    if view.nbytes < _FIXED.size:
        return Rejection.FORMAT
    hlen = _FIXED.unpack_from(view, 0)[6]
    return check_parts(view[:hlen], view[hlen:], key, layout)


def check_parts(header: bytes | memoryview, payload: memoryview, key: str | None,
                layout: BlockLayout | None = None, *,
                digest: int | None = None) -> BlockObject | Rejection:
    """`check_object` for an object read as two parts: its header, and its payload where the
    reader wanted it (a caller's buffer). The payload of what is returned is `payload`.
    `digest`: the payload's xxh3-64, where the copy that landed it computed it already."""
    view = memoryview(header).cast("B")
    if view.nbytes < _FIXED.size:
        return Rejection.FORMAT
    magic, version, fp_len, dt_len, key_len, ndim, hlen, plen, checksum = _FIXED.unpack_from(
        view, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        return Rejection.FORMAT
    if hlen != _header_len(fp_len, dt_len, key_len, ndim):
        return Rejection.FORMAT
    if hlen != view.nbytes or plen != payload.nbytes:
        return Rejection.LENGTH
    pos = _FIXED.size
    try:
        fingerprint = bytes(view[pos : pos + fp_len]).decode("utf-8")
        pos += fp_len
        dtype = bytes(view[pos : pos + dt_len]).decode("ascii")
        pos += dt_len
        stored_key = bytes(view[pos : pos + key_len]).decode("ascii")
        pos += key_len
    except UnicodeDecodeError:
        return Rejection.FORMAT
    if key is not None and stored_key != key:
        return Rejection.KEY
    shape = tuple(struct.unpack_from(f"<{ndim}Q", view, pos))
    if layout is not None and (fingerprint, dtype, shape) != (layout.fingerprint, layout.dtype,
                                                               layout.shape):
        return Rejection.LAYOUT
    if digest is None:
        digest = xxhash.xxh3_64_intdigest(payload)
    if digest != checksum:
        return Rejection.CHECKSUM
    return BlockObject(stored_key, fingerprint, dtype, shape, payload)


@dataclass(frozen=True)
class ObjectHeader:
    """What a header says about its object, read without hashing the payload."""

    key: str
    header_bytes: int
    payload_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes


# Bytes that hold the fixed part of every header: enough to learn the whole header's length.
HEADER_PEEK_BYTES = _FIXED.size


def peek_header(data: bytes | memoryview) -> ObjectHeader | int | None:
    """The key and lengths named by the header `data` starts with, without checking the payload
    (an SSD tier re-indexing its files reads headers only; the checksum is checked on read).
    An int: `data` is too short, the header needs that many bytes. None: not a header."""
    view = memoryview(data).cast("B")
    if view.nbytes < _FIXED.size:
        return _FIXED.size
    magic, version, fp_len, dt_len, key_len, ndim, hlen, plen, _ = _FIXED.unpack_from(view, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    if hlen != _header_len(fp_len, dt_len, key_len, ndim):
        return None
    if view.nbytes < hlen:
        return hlen
    pos = _FIXED.size + fp_len + dt_len
    try:
        key = bytes(view[pos : pos + key_len]).decode("ascii")
    except UnicodeDecodeError:
        return None
    return ObjectHeader(key, hlen, plen)


def decode_block(data: bytes | memoryview, key: str | None,
                 expected_fingerprint: str | None = None) -> BlockObject | None:
    """`check_object` for callers that only need yes or no; None for any rejection."""
    got = check_object(data, key)
    if isinstance(got, Rejection):
        return None
    if expected_fingerprint is not None and got.fingerprint != expected_fingerprint:
        return None
    return got


def scan_objects(data: mmap.mmap | bytes | bytearray
                 ) -> Iterator[tuple[int, int, BlockObject]]:
    """(offset, length, object) of every intact object in a segment, in offset order.

    Objects start at HEADER_ALIGN-aligned offsets; the search for the magic runs at C speed
    and every candidate is fully checked (header, lengths, checksum), so bytes of an
    overwritten or half-written object are skipped. Freed slots keep their bytes: an object
    removed from the pool is found again if nothing overwrote it (it is still exactly the
    object written for its key)."""
    view = memoryview(data)
    size = view.nbytes
    pos = 0
    while pos + _FIXED.size <= size:
        at = data.find(MAGIC, pos)
        if at < 0 or at + _FIXED.size > size:
            return
        if at % HEADER_ALIGN:
            pos = at + 1
            continue
        fields = _FIXED.unpack_from(view, at)
        total = fields[6] + fields[7]  # header length + payload length
        got = check_object(view[at : at + total], None) if at + total <= size else None
        if isinstance(got, BlockObject):
            yield at, total, got
            pos = at + total
        else:
            pos = at + HEADER_ALIGN
