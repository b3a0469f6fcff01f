"""The stored block object: a small self-describing header followed by the KV payload.

Layout (little-endian):
    fixed  "<4sHHHHIQQ": magic b"PKV1", format version, fingerprint length, dtype length, ndim,
           header length (bytes, multiple of 64), payload length, xxh3_64 of the payload
    then   fingerprint (utf-8), dtype (ascii), shape (ndim x u64), zero padding to header length
    then   payload

The header is padded to 64 bytes so the payload of an object placed at an aligned offset is
itself aligned, which lets readers view it as a tensor without a copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"PKV1"
FORMAT_VERSION = 1
HEADER_ALIGN = 64
_FIXED = struct.Struct("<4sHHHHIQQ")
_MAX_SHORT = 0xFFFF


@dataclass(frozen=True)
class BlockObject:
    fingerprint: str
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview | bytes


def _header_len(fp_len: int, dtype_len: int, ndim: int) -> int:
    raw = _FIXED.size + fp_len + dtype_len + 8 * ndim
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def _encode_header(fingerprint: str, dtype: str, shape: tuple[int, ...], payload_nbytes: int,
                   checksum: int) -> bytes:
    fp = fingerprint.encode("utf-8")
    dt = dtype.encode("ascii")
    if len(fp) > _MAX_SHORT or len(dt) > _MAX_SHORT or len(shape) > _MAX_SHORT:
        raise ValueError("fingerprint, dtype and shape must each be shorter than 65536")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape dimensions must be >= 0, got {shape}")
    hlen = _header_len(len(fp), len(dt), len(shape))
    head = (
        _FIXED.pack(MAGIC, FORMAT_VERSION, len(fp), len(dt), len(shape), hlen, payload_nbytes,
                    checksum)
        + fp
        + dt
        + struct.pack(f"<{len(shape)}Q", *shape)
    )
    return head + b"\x00" * (hlen - len(head))


def encoded_size(fingerprint: str, dtype: str, shape: tuple[int, ...], payload_nbytes: int) -> int:
    """Size in bytes of the encoded object, without building it (for allocation)."""
    fp_len = len(fingerprint.encode("utf-8"))
    return _header_len(fp_len, len(dtype.encode("ascii")), len(shape)) + payload_nbytes


def encode_block(
    fingerprint: str, dtype: str, shape: tuple[int, ...], payload: bytes | memoryview
) -> bytes:
    view = memoryview(payload).cast("B")
    header = _encode_header(fingerprint, dtype, tuple(shape), view.nbytes,
                            xxhash.xxh3_64_intdigest(view))
    return header + view


def decode_block(
    data: bytes | memoryview, expected_fingerprint: str | None = None
) -> BlockObject | None:
    """Parse and verify an object; None when it is not exactly a valid, intact object.

    The payload of the result is a zero-copy view into `data`.
    """
    view = memoryview(data).cast("B")
    if view.nbytes < _FIXED.size:
        return None
    magic, version, fp_len, dt_len, ndim, hlen, plen, checksum = _FIXED.unpack_from(view, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    if hlen != _header_len(fp_len, dt_len, ndim) or hlen + plen != view.nbytes:
        return None
    pos = _FIXED.size
    try:
        fingerprint = bytes(view[pos : pos + fp_len]).decode("utf-8")
        pos += fp_len
        dtype = bytes(view[pos : pos + dt_len]).decode("ascii")
    except UnicodeDecodeError:
        return None
    pos += dt_len
    shape = struct.unpack_from(f"<{ndim}Q", view, pos)
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        return None
    payload = view[hlen:]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        return None
    return BlockObject(fingerprint=fingerprint, dtype=dtype, shape=tuple(shape), payload=payload)
