"""Master metadata: the domain records and the backend that stores them.

The master keeps allocator state and LRU order in memory and rebuilds them from the backend, so
a backend only has to store records by key. That is what lets a durable `redis` backend slot in
later behind the same `MetadataBackend` protocol.
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


class MetadataBackend(Protocol):
    """Key -> ObjectMeta and node_id -> NodeInfo storage. Not thread-safe: the master locks."""

    def get(self, key: str) -> ObjectMeta | None: ...
    def put(self, meta: ObjectMeta) -> None: ...
    def delete(self, key: str) -> ObjectMeta | None: ...
    def scan(self, prefix: str = "") -> Iterator[ObjectMeta]: ...
    def count(self) -> int: ...
    def put_node(self, node: NodeInfo) -> None: ...
    def delete_node(self, node_id: str) -> None: ...
    def nodes(self) -> list[NodeInfo]: ...


class MemoryBackend:
    """The embedded default: plain dicts, lost when the master exits."""

    def __init__(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}
        self._nodes: dict[str, NodeInfo] = {}

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

    def put_node(self, node: NodeInfo) -> None:
        self._nodes[node.node_id] = node

    def delete_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def nodes(self) -> list[NodeInfo]:
        return list(self._nodes.values())


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
