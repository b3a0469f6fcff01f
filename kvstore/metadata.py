"""Pool metadata: the domain records and the backend that stores the master's objects.

The master keeps allocator state, LRU order and membership in memory, so a backend only has to
store object records by key. That is what lets a durable `redis` backend slot in later behind
the same `MetadataBackend` protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host_id: str
    address: str
    segment_path: str
    segment_size: int
    tcp_address: str = ""
    # Which registration this is; 0 until the master assigns one (every registration a new one).
    epoch: int = 0


class ObjectState(enum.Enum):
    PENDING = "pending"  # allocated, bytes being written; invisible to readers
    SEALED = "sealed"


@dataclass(frozen=True)
class ObjectMeta:
    key: str
    node_id: str
    offset: int
    length: int
    slot_bytes: int
    state: ObjectState
    # For PENDING: monotonic deadline after which the put is considered abandoned.
    deadline: float = 0.0
    epoch: int = 0  # the node's registration the slot belongs to
    token: int = 0  # the put's fencing token: only its holder seals or aborts it


@dataclass(frozen=True)
class BlockLocation:
    """Where a client finds an object: the bytes at [offset, offset + length) of a node."""

    key: str
    node_id: str
    offset: int
    length: int
    epoch: int = 0


@dataclass(frozen=True)
class ObjectEntry:
    """One object as the master lists it (`kvstore ls`)."""

    location: BlockLocation
    sealed: bool
    leased: bool


class MetadataBackend(Protocol):
    """Key -> ObjectMeta storage. Not thread-safe: the master locks."""

    def get(self, key: str) -> ObjectMeta | None: ...
    def put(self, meta: ObjectMeta) -> None: ...
    def delete(self, key: str) -> ObjectMeta | None: ...
    def scan(self, prefix: str = "") -> Iterator[ObjectMeta]: ...
    def count(self) -> int: ...


class MemoryBackend:
    """The embedded default: plain dicts, lost when the master exits."""

    def __init__(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}

    def get(self, key: str) -> ObjectMeta | None:
        return self._objects.get(key)

    def put(self, meta: ObjectMeta) -> None:
        self._objects[meta.key] = meta

    def delete(self, key: str) -> ObjectMeta | None:
        return self._objects.pop(key, None)

    def scan(self, prefix: str = "") -> Iterator[ObjectMeta]:
        for key in sorted(self._objects):
            if key.startswith(prefix):
                yield self._objects[key]

    def count(self) -> int:
        return len(self._objects)


def create_backend(name: str) -> MetadataBackend:
    if name == "memory":
        return MemoryBackend()
    raise ValueError(f"unknown metadata backend {name!r}")


@dataclass(frozen=True)
class NodeStatus:
    node: NodeInfo
    capacity_bytes: int
    used_bytes: int
    objects: int
    heartbeat_age_s: float


@dataclass(frozen=True)
class PoolStatus:
    nodes: tuple[NodeStatus, ...]
    capacity_bytes: int
    used_bytes: int
    objects: int
    hits: int
    misses: int
    evictions: int
    puts: int
    membership: int = 0  # changes whenever a node registers or is dropped
