"""Pool metadata: the domain records and the backend that stores them.

The master keeps allocator state, LRU order and leases in memory and rebuilds them from the
records at start, so a backend stores only object records by key and node records by id. The
embedded `MemoryBackend` loses them with the master (the nodes then report what they hold when
they register again); `kvstore.redis_metadata.RedisBackend` keeps them in a redis-server.
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


@dataclass(frozen=True)
class NodeRecord:
    """A registered node as the master must remember it to keep serving it after a restart:
    its registration (with the epoch) and that epoch's write-grant key."""

    info: NodeInfo
    grant_key: bytes


@dataclass(frozen=True)
class HeldObject:
    """An intact object a node found in its own segment (its header names the key)."""

    key: str
    offset: int
    length: int


class MetadataBackend(Protocol):
    """Key -> ObjectMeta and node id -> NodeRecord storage. Not thread-safe: the master locks
    and calls `commit` at the end of every operation that changed something."""

    def get(self, key: str) -> ObjectMeta | None: ...
    def put(self, meta: ObjectMeta) -> None: ...
    def delete(self, key: str) -> ObjectMeta | None: ...
    def scan(self, prefix: str = "") -> Iterator[ObjectMeta]: ...
    def count(self) -> int: ...
    def put_node(self, record: NodeRecord) -> None: ...
    def delete_node(self, node_id: str) -> None: ...
    def nodes(self) -> list[NodeRecord]: ...
    def commit(self) -> None:
        """Make the changes since the last commit durable (one round trip for a remote store)."""
    def close(self) -> None: ...


class MemoryBackend:
    """The embedded default: plain dicts, lost when the master exits."""

    def __init__(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}
        self._nodes: dict[str, NodeRecord] = {}

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

    def put_node(self, record: NodeRecord) -> None:
        self._nodes[record.info.node_id] = record

    def delete_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def nodes(self) -> list[NodeRecord]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def create_backend(url: str) -> MetadataBackend:
    """'memory', or redis://HOST:PORT/DB (connected and loaded before this returns)."""
    if url == "memory":
        return MemoryBackend()
    if url.startswith("redis://"):
        from kvstore.redis_metadata import RedisBackend

        return RedisBackend(url)
    raise ValueError(f"unknown metadata backend {url!r}")


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
