"""Mooncake-format request traces: one JSON object a line, timestamps in ms, `hash_ids` naming
the prompt's blocks (chained: equal ids at the same position mean a reusable prefix)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_line(line: str, where: str) -> TraceRequest:
    try:
        obj = json.loads(line)
        return TraceRequest(int(obj["timestamp"]), int(obj["input_length"]),
                            int(obj["output_length"]), tuple(int(h) for h in obj["hash_ids"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not a Mooncake trace line ({exc})") from exc


def read_trace(path: str | Path, limit: int = 0) -> list[TraceRequest]:
    """The first `limit` requests (0 = all), in file order, which is arrival order."""
    return list(_lines(Path(path), limit))


def _lines(path: Path, limit: int) -> Iterator[TraceRequest]:
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"trace: cannot read {path}: {exc.strerror}") from exc
    with f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield parse_line(line, f"{path}:{lineno}")
            n += 1
            if limit and n >= limit:
                return
