"""A GGUF file's metadata and tensor index, read in one pass over the header.

The `gguf` package's reader builds numpy views for every part of every metadata value: SmolLM2's
~98k tokenizer strings took it 3.7 s, on each engine's start and the conductor's. This reads the
same format (GGUF versions 2 and 3, little-endian) with `struct` over the mapped file and makes
numpy views only of the tensors: 0.1 s. Values come out as gguf's `ReaderField.contents()`
gives them (str, int, float, bool, lists of those), tensors as its `ReaderTensor` has them (the
raw rows of a quantized tensor, typed values otherwise, GGML's dimension order in `shape`), so
dequantization and the tokenizer see what they saw before (`tests/engine/test_gguf_reader.py`
compares the two on the shipped SmolLM2 file).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from engine.errors import UnsupportedModel

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF's numeric value types (little-endian), by type id.
_NUMBERS: dict[int, np.dtype[Any]] = {
    kind: np.dtype(code) for kind, code in ((0, "<u1"), (1, "<i1"), (2, "<u2"), (3, "<i2"),
                                            (4, "<u4"), (5, "<i4"), (6, "<f4"), (7, "?"),
                                            (10, "<u8"), (11, "<i8"), (12, "<f8"))}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain values; every other type is blocks of raw bytes.
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGML's order: the fastest-varying dimension first
    data: np.ndarray        # a read-only view of the file


class _Cursor:
    """Reads little-endian values off the mapped file, naming the offset when it runs out."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise UnsupportedModel(f"{self.path}: truncated GGUF header at byte {self.pos}") \
                from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise UnsupportedModel(f"{self.path}: truncated GGUF string at byte {self.pos}")
        raw = self.buf[self.pos : end]
        self.pos = end
        return raw.decode("utf-8")

    def numbers(self, dtype: np.dtype[Any], count: int) -> list[Any]:
        """`count` values of `dtype` as Python numbers, read as one view."""
        end = self.pos + count * dtype.itemsize
        if end > len(self.buf):
            raise UnsupportedModel(f"{self.path}: truncated GGUF value at byte {self.pos}")
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos = end
        return values

    def value(self, kind: int) -> Any:
        if kind in _NUMBERS:
            return self.numbers(_NUMBERS[kind], 1)[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item in _NUMBERS:
                return self.numbers(_NUMBERS[item], count)
            return [self.value(item) for _ in range(count)]  # arrays of arrays
        raise UnsupportedModel(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")


class GGUFReader:
    """`fields` (key -> value) and `tensors` (in file order) of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._map, self.path)
        if self._map[:4] != MAGIC:
            raise UnsupportedModel(f"{self.path}: not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in VERSIONS:
            raise UnsupportedModel(f"{self.path}: GGUF version {version} (byte-swapped, or "
                                   f"not one of {VERSIONS}) is not supported")
        tensor_count, kv_count = cur.unpack("<Q"), cur.unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string()
            self.fields[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = cur.string()
            dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise UnsupportedModel(f"{self.path}: general.alignment {alignment!r} is not a "
                                   "power of two")
        start = -(-cur.pos // alignment) * alignment
        data = np.frombuffer(self._map, np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in infos:
            self.tensors.append(self._tensor(data, start, name, dims, kind, offset))

    def _tensor(self, data: np.ndarray, start: int, name: str, dims: tuple[int, ...], kind: int,
                offset: int) -> GGUFTensor:
        try:
            ggml_type = GGMLQuantizationType(kind)
        except ValueError:
            raise UnsupportedModel(f"{self.path}: tensor {name!r} has unknown type {kind}") \
                from None
        n = math.prod(dims)
        block, type_bytes = GGML_QUANT_SIZES[ggml_type]
        begin, size = start + offset, n * type_bytes // block
        if begin + size > data.size:
            raise UnsupportedModel(f"{self.path}: tensor {name!r} runs past the end of the file")
        np_dims = tuple(reversed(dims))
        raw = data[begin : begin + size]
        plain = _PLAIN.get(ggml_type)
        if plain is not None:
            view = raw.view(plain).reshape(np_dims)
        else:
            view = raw.reshape(quant_shape_to_byte_shape(np_dims, ggml_type))
        return GGUFTensor(name, ggml_type, dims, view)
