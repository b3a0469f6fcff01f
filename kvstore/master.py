"""The master's domain logic: membership, placement, two-phase put, leases, LRU eviction.

Metadata only: the master hands out (node, offset, length) and never touches object bytes.
All methods are thread-safe (one lock; every operation is short and in memory).

Every registration of a node opens a new epoch, carried in each of its locations, with a new
key for the write grants the node checks; every put gets a token that alone can seal or abort
it. A put that needs room evicts exactly the objects of one block that makes room, or nothing.

Recovery: the master rebuilds its allocators from the backend's records at start (a Redis
backend has them all; pending puts are reclaimed), and a node that registers again reports the
intact objects its segment holds, which the master adopts as sealed in the new epoch, so a
master restarted on the memory backend serves them again too.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from kvstore.allocator import BuddyAllocator
from kvstore.config import MasterConfig
from kvstore.errors import InvalidKeyError, UnknownNodeError
from kvstore.grants import WriteGrant, new_grant_key, sign
from kvstore.limits import check_key
from kvstore.metadata import (
    HeldObject,
    MetadataBackend,
    NodeInfo,
    NodeRecord,
    NodeStatus,
    ObjectMeta,
    ObjectState,
    PoolStatus,
    create_backend,
)

log = logging.getLogger(__name__)


class PutOutcome(enum.Enum):
    ALLOCATED = "allocated"
    EXISTS = "exists"
    IN_PROGRESS = "in_progress"
    NO_SPACE = "no_space"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class PutGrant:
    key: str
    outcome: PutOutcome
    location: ObjectMeta | None = None
    grant: WriteGrant | None = None


@dataclass(frozen=True)
class Registration:
    """What a node gets for registering: its epoch and the key of that epoch's write grants."""

    epoch: int
    grant_key: bytes
    adopted: int = 0  # objects of the node's report taken back as sealed


@dataclass(frozen=True)
class MasterStats:
    """What the master has done since it started, beyond `PoolStatus` (for /metrics)."""

    puts_started: int
    puts_aborted: int
    puts_expired: int
    match_prefix_calls: int
    blocks_matched: int
    active_leases: int
    objects_recovered: int  # sealed objects taken back from records or node reports


@dataclass
class _Node:
    info: NodeInfo
    allocator: BuddyAllocator
    last_heartbeat: float
    grant_key: bytes
    # Sealed keys of this node and their offsets, least recently used first.
    lru: OrderedDict[str, int] = field(default_factory=OrderedDict)
    keys: set[str] = field(default_factory=set)
    # The key of every live slot (sealed or pending); zombie slots are not in it.
    by_offset: dict[int, str] = field(default_factory=dict)


class Master:
    def __init__(
        self,
        config: MasterConfig | None = None,
        backend: MetadataBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or MasterConfig()
        self._backend = backend or create_backend(self.config.metadata)
        self._clock = clock
        self._wall = wall_clock
        # Epochs grow across master restarts too (they start from the time), so a location
        # from before a restart never names a registration that exists after it.
        self._last_epoch = 0
        self.membership = 0
        self._lock = threading.RLock()
        self._nodes: dict[str, _Node] = {}
        self._leases: dict[str, float] = {}
        # Slots of removed objects that were leased: freed only once the lease runs out, so a
        # reader mid-copy never sees the slot reused under it.
        self._zombies: list[tuple[str, int, float]] = []
        self._pending: set[str] = set()
        # `puts` counts sealed puts; every started put ends sealed, aborted, expired, or
        # dropped with its node.
        self.hits = self.misses = self.evictions = self.puts = 0
        self.puts_started = self.puts_aborted = self.puts_expired = 0
        self.match_prefix_calls = self.blocks_matched = self.objects_recovered = 0
        self._recover()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The lock, and one commit of whatever the operation changed in the backend."""
        with self._lock:
            try:
                yield
            finally:
                self._backend.commit()

    def _recover(self) -> None:
        """Rebuild nodes and allocators from the backend's records; reclaim pending puts."""
        with self._writing():
            now = self._clock()
            for rec in self._backend.nodes():
                alloc = BuddyAllocator(rec.info.segment_size, self.config.min_slot_bytes)
                # A node that died meanwhile is dropped after node_timeout_s like any other.
                self._nodes[rec.info.node_id] = _Node(rec.info, alloc, now, rec.grant_key)
                self._last_epoch = max(self._last_epoch, rec.info.epoch)
            for meta in list(self._backend.scan()):
                node = self._nodes.get(meta.node_id)
                if (meta.state is ObjectState.SEALED and node is not None
                        and meta.epoch == node.info.epoch
                        and node.allocator.reserve(meta.offset, meta.length) is not None):
                    self._track(node, meta.key, meta.offset)
                    self.objects_recovered += 1
                    continue
                if meta.state is ObjectState.PENDING:
                    self.puts_expired += 1
                self._backend.delete(meta.key)
            if self._nodes:
                log.info("recovered %d nodes and %d objects from %s", len(self._nodes),
                         self.objects_recovered, self.config.metadata)

    @staticmethod
    def _track(node: _Node, key: str, offset: int) -> None:
        node.lru[key] = offset
        node.keys.add(key)
        node.by_offset[offset] = key

    def _adopt(self, node: _Node, held: Sequence[HeldObject]) -> int:
        """Take the objects a registering node holds as sealed, each whose slot is free and
        whose key is not stored elsewhere; how many were taken."""
        n = 0
        for obj in sorted(held, key=lambda h: h.offset):
            try:
                check_key(obj.key)
            except InvalidKeyError:
                continue
            if self._backend.get(obj.key) is not None:
                continue
            slot = node.allocator.reserve(obj.offset, obj.length)
            if slot is None:
                continue
            self._backend.put(ObjectMeta(obj.key, node.info.node_id, obj.offset, obj.length,
                                         slot, ObjectState.SEALED, 0.0, node.info.epoch,
                                         secrets.randbits(63) + 1))
            self._track(node, obj.key, obj.offset)
            n += 1
        self.objects_recovered += n
        return n

    # ---- membership -------------------------------------------------------------------------

    def register_node(self, info: NodeInfo, held: Sequence[HeldObject] = ()) -> Registration:
        """A new epoch for the node; `held`: the intact objects its segment holds, adopted."""
        with self._writing():
            if info.node_id in self._nodes:
                # A re-registration means the node restarted or we dropped it: its old slots
                # are meaningless now.
                self._drop_node(info.node_id, reason="re-registered")
            self._last_epoch = max(self._last_epoch + 1, time.time_ns() // 1000)
            info = replace(info, epoch=self._last_epoch)
            alloc = BuddyAllocator(info.segment_size, self.config.min_slot_bytes)
            key = new_grant_key()
            node = self._nodes[info.node_id] = _Node(info, alloc, self._clock(), key)
            self._backend.put_node(NodeRecord(info, key))
            adopted = self._adopt(node, held)
            self.membership += 1
            log.info("node %s registered (host %s, %s, %d bytes, epoch %d, %d of %d held "
                     "objects adopted)", info.node_id, info.host_id, info.address,
                     info.segment_size, info.epoch, adopted, len(held))
            return Registration(info.epoch, key, adopted)

    def heartbeat(self, node_id: str, epoch: int) -> bool:
        """False when `epoch` is not the node's current registration: it must register again."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.info.epoch != epoch:
                return False
            node.last_heartbeat = self._clock()
            return True

    def node(self, node_id: str) -> NodeInfo:
        with self._lock:
            if node_id not in self._nodes:
                raise UnknownNodeError(f"unknown node {node_id!r}")
            return self._nodes[node_id].info

    def _drop_node(self, node_id: str, reason: str) -> None:
        node = self._nodes.pop(node_id)
        self._backend.delete_node(node_id)
        for key in node.keys:
            self._backend.delete(key)
            self._leases.pop(key, None)
            self._pending.discard(key)
        self._zombies = [z for z in self._zombies if z[0] != node_id]
        self.membership += 1
        log.warning("node %s dropped (%s) with %d objects", node_id, reason, len(node.keys))

    # ---- two-phase put ----------------------------------------------------------------------

    def put_start(
        self, keys: Sequence[str], sizes: Sequence[int], client_host_id: str = ""
    ) -> list[PutGrant]:
        assert len(keys) == len(sizes), "keys and sizes must pair up"
        grants: list[PutGrant] = []
        with self._writing():
            now = self._clock()
            touched: set[str] = set()
            for key, size in zip(keys, sizes, strict=True):
                existing = self._backend.get(key)
                if existing is not None:
                    sealed = existing.state is ObjectState.SEALED
                    grants.append(PutGrant(key, PutOutcome.EXISTS if sealed
                                           else PutOutcome.IN_PROGRESS))
                    continue
                if size > self.config.max_object_bytes:
                    grants.append(PutGrant(key, PutOutcome.TOO_LARGE))
                    continue
                placed = self._place(size, client_host_id)
                if placed is None:
                    grants.append(PutGrant(key, PutOutcome.NO_SPACE))
                    continue
                node, offset, slot = placed
                token = secrets.randbits(63) + 1
                meta = ObjectMeta(key, node.info.node_id, offset, size, slot,
                                  ObjectState.PENDING, now + self.config.put_timeout_s,
                                  node.info.epoch, token)
                self._backend.put(meta)
                self._pending.add(key)
                self.puts_started += 1
                node.keys.add(key)
                node.by_offset[offset] = key
                touched.add(node.info.node_id)
                expires = int((self._wall() + self.config.put_timeout_s) * 1000)
                grant = sign(node.grant_key, offset, size, node.info.epoch, token, expires)
                grants.append(PutGrant(key, PutOutcome.ALLOCATED, meta, grant))
            for node_id in touched:
                self._enforce_watermark(self._nodes[node_id])
        return grants

    def _place(self, size: int, client_host_id: str) -> tuple[_Node, int, int] | None:
        # Local host first (the writer copies through shm), then the emptiest node.
        order = sorted(
            self._nodes.values(),
            key=lambda n: (n.info.host_id != client_host_id or not client_host_id,
                           -n.allocator.free_bytes, n.info.node_id),
        )
        for node in order:
            got = node.allocator.allocate(size)
            if got is not None:
                return node, got[0], got[1]
        for node in order:
            got = self._allocate_evicting(node, size)
            if got is not None:
                return node, got[0], got[1]
        return None

    def _allocate_evicting(self, node: _Node, size: int) -> tuple[int, int] | None:
        def evictable(offset: int) -> bool:
            key = node.by_offset.get(offset)
            return key is not None and key in node.lru and self._evictable(key)

        plan = node.allocator.eviction_plan(size, list(node.lru.values()), evictable)
        if plan is None:
            return None
        for offset in plan:
            self._evict(node, node.by_offset[offset])
        got = node.allocator.allocate(size)
        assert got is not None, "an eviction plan frees a whole block of the needed size"
        return got

    def _evictable(self, key: str) -> bool:
        until = self._leases.get(key)
        return until is None or until <= self._clock()

    def _evict(self, node: _Node, key: str) -> None:
        meta = self._backend.delete(key)
        assert meta is not None and meta.state is ObjectState.SEALED, f"evicting {key}"
        node.lru.pop(key, None)
        node.keys.discard(key)
        node.by_offset.pop(meta.offset, None)
        self._leases.pop(key, None)
        node.allocator.free(meta.offset)
        self.evictions += 1

    def _enforce_watermark(self, node: _Node) -> None:
        alloc = node.allocator
        if alloc.capacity == 0 or alloc.used <= self.config.high_watermark * alloc.capacity:
            return
        target = self.config.low_watermark * alloc.capacity
        for key in list(node.lru):
            if alloc.used <= target:
                break
            if self._evictable(key):
                self._evict(node, key)

    def put_end(self, tickets: Sequence[tuple[str, int]]) -> list[bool]:
        """Seal each (key, token) put; True only for the put that token was granted for (again
        True when that same put is already sealed). A reclaimed put's token seals nothing."""
        out: list[bool] = []
        with self._writing():
            for key, token in tickets:
                meta = self._backend.get(key)
                if meta is None or meta.token != token or meta.node_id not in self._nodes:
                    out.append(False)
                    continue
                if meta.state is ObjectState.PENDING:
                    self._backend.put(replace(meta, state=ObjectState.SEALED, deadline=0.0))
                    self._nodes[meta.node_id].lru[key] = meta.offset
                    self._pending.discard(key)
                    self.puts += 1
                out.append(True)
        return out

    def put_abort(self, tickets: Sequence[tuple[str, int]]) -> int:
        """Give up the pending puts of these (key, token) pairs; others are left alone."""
        n = 0
        with self._writing():
            for key, token in tickets:
                meta = self._backend.get(key)
                if (meta is not None and meta.state is ObjectState.PENDING
                        and meta.token == token):
                    self._delete(meta)
                    n += 1
            self.puts_aborted += n
        return n

    def _delete(self, meta: ObjectMeta) -> None:
        self._backend.delete(meta.key)
        self._pending.discard(meta.key)
        node = self._nodes[meta.node_id]
        node.lru.pop(meta.key, None)
        node.keys.discard(meta.key)
        node.by_offset.pop(meta.offset, None)
        until = self._leases.pop(meta.key, None)
        if until is not None and until > self._clock():
            self._zombies.append((meta.node_id, meta.offset, until))
        else:
            node.allocator.free(meta.offset)

    # ---- reads ------------------------------------------------------------------------------

    def _sealed(self, key: str) -> ObjectMeta | None:
        meta = self._backend.get(key)
        if meta is None or meta.state is not ObjectState.SEALED:
            return None
        return meta

    def _lease_and_touch(self, meta: ObjectMeta, now: float) -> None:
        until = now + self.config.lease_ms / 1000.0
        self._leases[meta.key] = max(until, self._leases.get(meta.key, 0.0))
        self._nodes[meta.node_id].lru.move_to_end(meta.key)

    def get_replicas(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """Sealed locations (leased for lease_ms, LRU-touched); None per missing key."""
        out: list[ObjectMeta | None] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                meta = self._sealed(key)
                if meta is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self._lease_and_touch(meta, now)
                out.append(meta)
        return out

    def match_prefix(self, keys: Sequence[str]) -> list[ObjectMeta]:
        """Locations of the longest run of leading sealed keys (leased and LRU-touched)."""
        out: list[ObjectMeta] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                meta = self._sealed(key)
                if meta is None:
                    break
                self._lease_and_touch(meta, now)
                out.append(meta)
            self.match_prefix_calls += 1
            self.blocks_matched += len(out)
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [self._sealed(k) is not None for k in keys]

    def remove(self, keys: Sequence[str]) -> int:
        """Remove sealed objects; pending puts are left to finish or time out."""
        n = 0
        with self._writing():
            for key in keys:
                meta = self._sealed(key)
                if meta is not None:
                    self._delete(meta)
                    n += 1
        return n

    def evict(self, nbytes: int = 0, prefix: str | None = None) -> tuple[int, int]:
        """Evict sealed objects: every one whose key starts with `prefix` ("": all of them),
        or, with no prefix, the least recently used of the fullest nodes first until their
        slots add up to `nbytes`. A leased object's slot stays taken until its lease ends.
        (objects, slot bytes) evicted."""
        with self._writing():
            if prefix is not None:
                victims = [m for m in self._backend.scan(prefix) if m.state is ObjectState.SEALED]
            else:
                victims, total = [], 0
                for node in sorted(self._nodes.values(),
                                   key=lambda n: (-n.allocator.used, n.info.node_id)):
                    for key in node.lru:
                        if total >= nbytes:
                            break
                        meta = self._backend.get(key)
                        assert meta is not None, key
                        victims.append(meta)
                        total += meta.slot_bytes
            for meta in victims:
                self._delete(meta)
            self.evictions += len(victims)
            return len(victims), sum(m.slot_bytes for m in victims)

    # ---- housekeeping -----------------------------------------------------------------------

    def reap(self) -> None:
        """Drop silent nodes, reclaim abandoned puts and expired zombie slots, apply watermarks."""
        with self._writing():
            now = self._clock()
            for node_id, node in list(self._nodes.items()):
                if now - node.last_heartbeat > self.config.node_timeout_s:
                    self._drop_node(node_id, reason="heartbeat timeout")
            for key in list(self._pending):
                meta = self._backend.get(key)
                assert meta is not None and meta.state is ObjectState.PENDING, key
                if meta.deadline <= now:
                    log.warning("put of %s on %s abandoned; reclaiming", meta.key, meta.node_id)
                    self._delete(meta)
                    self.puts_expired += 1
            still: list[tuple[str, int, float]] = []
            for node_id, offset, until in self._zombies:
                if until <= now:
                    self._nodes[node_id].allocator.free(offset)
                else:
                    still.append((node_id, offset, until))
            self._zombies = still
            self._leases = {k: u for k, u in self._leases.items() if u > now}
            for node in self._nodes.values():
                self._enforce_watermark(node)

    def status(self) -> PoolStatus:
        with self._lock:
            now = self._clock()
            nodes = tuple(
                NodeStatus(n.info, n.allocator.capacity, n.allocator.used, len(n.keys),
                           now - n.last_heartbeat)
                for n in sorted(self._nodes.values(), key=lambda n: n.info.node_id)
            )
            return PoolStatus(
                nodes=nodes,
                capacity_bytes=sum(n.capacity_bytes for n in nodes),
                used_bytes=sum(n.used_bytes for n in nodes),
                objects=self._backend.count(),
                hits=self.hits, misses=self.misses, evictions=self.evictions, puts=self.puts,
                membership=self.membership,
            )

    def stats(self) -> MasterStats:
        with self._lock:
            now = self._clock()
            return MasterStats(
                puts_started=self.puts_started, puts_aborted=self.puts_aborted,
                puts_expired=self.puts_expired, match_prefix_calls=self.match_prefix_calls,
                blocks_matched=self.blocks_matched,
                active_leases=sum(1 for until in self._leases.values() if until > now),
                objects_recovered=self.objects_recovered,
            )

    def list_objects(self, prefix: str = "", limit: int = 100) -> tuple[list[tuple[ObjectMeta,
                                                                                   bool]], bool]:
        """(objects with their leased flag, truncated) in key order."""
        with self._lock:
            now = self._clock()
            out: list[tuple[ObjectMeta, bool]] = []
            for meta in self._backend.scan(prefix):
                if len(out) >= limit:
                    return out, True
                out.append((meta, self._leases.get(meta.key, 0.0) > now))
            return out, False

    def close(self) -> None:
        with self._writing():
            pass
        self._backend.close()
