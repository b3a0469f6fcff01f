"""Content digest identifying a model's weights, so caches keyed by it never mix models."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import xxhash

_CHUNK = 8 << 20
# Hashing ~100 MB+ on every load is wasteful; files are identified by (path, mtime, size).
_cache: dict[tuple[tuple[str, int, int], ...], str] = {}


def weights_digest(files: Sequence[Path]) -> str:
    """xxh3_128 hex over the bytes of files, in the given order, streamed."""
    key = tuple(
        (str(p.resolve()), (st := os.stat(p)).st_mtime_ns, st.st_size) for p in files
    )
    cached = _cache.get(key)
    if cached is not None:
        return cached
    h = xxhash.xxh3_128()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    digest = h.hexdigest()
    _cache[key] = digest
    return digest
