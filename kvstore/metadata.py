"""Pool metadata: the domain records and the backend that stores them.

The master keeps allocator state, LRU order and leases in memory and rebuilds them from the
records at start, so a backend stores only object records by key (each object: its replicas,
one per (node, tier)) and node records by id. The
embedded `MemoryBackend` loses them with the master (the nodes then report what they hold when
they register again); `kvstore.redis_metadata.RedisBackend` keeps them in a redis-server.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
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
    # The node's SSD tier: its directory (same-host clients read files there) and capacity.
    ssd_dir: str = ""
    ssd_bytes: int = 0


class ObjectState(enum.Enum):
    PENDING = "pending"  # allocated, bytes being written; invisible to readers
    SEALED = "sealed"


DRAM = "dram"
SSD = "ssd"  # a file of the node's SSD tier: offset 0, length the object's bytes


@dataclass(frozen=True)
class ObjectMeta:
    """One replica of an object: where it lives and the state of its put."""

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
    tier: str = DRAM  # an object has at most one replica per (node, tier)

    @property
    def sealed(self) -> bool:
        return self.state is ObjectState.SEALED


@dataclass(frozen=True)
class StoredObject:
    """A key and its replicas, in the order they were placed (the writer's host first)."""

    key: str
    replicas: tuple[ObjectMeta, ...]

    def __post_init__(self) -> None:
        assert self.replicas, f"{self.key}: an object has at least one replica"
        assert all(r.key == self.key for r in self.replicas), self.key
        places = [(r.node_id, r.tier) for r in self.replicas]
        assert len(set(places)) == len(places), f"{self.key}: two replicas in one place"

    @property
    def sealed(self) -> tuple[ObjectMeta, ...]:
        return tuple(r for r in self.replicas if r.sealed)

    @property
    def pending(self) -> tuple[ObjectMeta, ...]:
        return tuple(r for r in self.replicas if not r.sealed)

    def on(self, node_id: str, tier: str = DRAM) -> ObjectMeta | None:
        for r in self.replicas:
            if r.node_id == node_id and r.tier == tier:
                return r
        return None

    def without(self, replica: ObjectMeta) -> StoredObject | None:
        """This object less `replica`; None when it was the last one."""
        rest = tuple(r for r in self.replicas
                     if (r.node_id, r.tier) != (replica.node_id, replica.tier))
        return StoredObject(self.key, rest) if rest else None

    def with_replica(self, replica: ObjectMeta) -> StoredObject:
        """This object with `replica` added, or replacing the one in the same place."""
        rest = tuple(r for r in self.replicas
                     if (r.node_id, r.tier) != (replica.node_id, replica.tier))
        return StoredObject(self.key, (*rest, replica))


@dataclass(frozen=True)
class BlockLocation:
    """Where a client finds an object: the bytes at [offset, offset + length) of a node."""

    key: str
    node_id: str
    offset: int
    length: int
    epoch: int = 0
    tier: str = DRAM


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
    draining: bool = False  # kvstore drain: a standby or restarted master keeps draining it


@dataclass(frozen=True)
class HeldObject:
    """An intact object a node found in its own segment or SSD tier (its header names the
    key)."""

    key: str
    offset: int
    length: int
    tier: str = DRAM


class MetadataBackend(Protocol):
    """Key -> StoredObject and node id -> NodeRecord storage. Not thread-safe: the master locks
    and calls `commit` at the end of every operation that changed something."""

    def get(self, key: str) -> StoredObject | None: ...
    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        """`get` of each key, at C speed (a prefix match looks up thousands at once)."""
    def put(self, obj: StoredObject) -> None: ...
    def delete(self, key: str) -> StoredObject | None: ...
    def scan(self, prefix: str = "") -> Iterator[StoredObject]: ...
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
        self._objects: dict[str, StoredObject] = {}
        self._nodes: dict[str, NodeRecord] = {}

    def get(self, key: str) -> StoredObject | None:
        return self._objects.get(key)

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        return list(map(self._objects.get, keys))

    def put(self, obj: StoredObject) -> None:
        self._objects[obj.key] = obj

    def delete(self, key: str) -> StoredObject | None:
        return self._objects.pop(key, None)

    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
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
class DrainState:
    """A draining node as one `Drain` call leaves it."""

    node_id: str
    draining: bool
    keys: tuple[str, ...]  # sealed keys with a replica on it still to move (up to the limit)
    replicas: int  # replicas it still holds, pending ones included
    dropped: int  # replicas given up by this call


@dataclass(frozen=True)
class NodeStatus:
    node: NodeInfo
    capacity_bytes: int
    used_bytes: int
    objects: int
    heartbeat_age_s: float
    draining: bool = False
    ssd_used_bytes: int = 0
    ssd_objects: int = 0


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
    leader: str = ""  # the leading master's address (set by the gRPC edge)
    role: str = ""  # the answering master's role: "leader"
