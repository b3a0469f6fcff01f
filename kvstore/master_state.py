"""The master's state and the steps every operation shares: its nodes (allocator, eviction
order, keys, leases), zombie slots and pending puts, and how one replica leaves (removed, evicted,
unlinked). The operations are mixins over this base, one module each: recovery
(`kvstore.master_recovery`), puts (`kvstore.master_puts`), reads (`kvstore.master_reads`),
operator commands (`kvstore.master_admin`), SSD tiers (`kvstore.master_tiers`); `kvstore.master`
composes them with membership and housekeeping.

All methods run under the master's one lock (`_writing` takes it and commits the backend).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

from kvstore.config import MasterConfig
from kvstore.events import EventKind, EventLog
from kvstore.eviction import MIDDLE, POLICIES, BlockHint, EvictionPolicy, make_policy
from kvstore.metadata import (
    DRAM,
    SSD,
    MetadataBackend,
    NodeInfo,
    ObjectMeta,
    StoredObject,
    create_backend,
)
from kvstore.object_index import IndexedObjects
from kvstore.slab_allocator import SlabAllocator
from kvstore.tiering import SsdBook

log = logging.getLogger(__name__)

# An SSD replica's lease is held per (key, node id); a DRAM replica's in its node's `leases`.
SsdReplicaId = tuple[str, str]

# Hints kept for keys a prefix match missed (the put that follows gets them), at most.
MAX_HINTS = 1 << 18


@dataclass
class PoolNode:
    info: NodeInfo
    allocator: SlabAllocator
    last_heartbeat: float
    grant_key: bytes
    # Sealed DRAM keys of this node, in the order the master's policy evicts them.
    order: EvictionPolicy
    # Sealed DRAM keys of this node and their offsets.
    offsets: dict[str, int] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    # The key of every live slot (sealed or pending); zombie slots are not in it.
    by_offset: dict[int, str] = field(default_factory=dict)
    # Leases on this node's DRAM replicas: key -> until (monotonic). One dict update covers
    # the thousands of keys of a prefix match; expired entries go at the next reap.
    leases: dict[str, float] = field(default_factory=dict)

    def seal(self, key: str, offset: int, hint: BlockHint) -> None:
        """The replica of `key` at `offset` is sealed: readable, and evictable by the policy."""
        self.offsets[key] = offset
        self.order.touch(key, hint)

    def unseal(self, key: str) -> None:
        self.offsets.pop(key, None)
        self.order.discard(key)

    def eviction_order(self) -> Iterator[str]:
        """Sealed DRAM keys, the policy's first victim first (none evicted)."""
        return cast(Iterator[str], self.order.victims())


class MasterState:
    """The master's records in memory and the steps shared by its operations."""

    def __init__(
        self,
        config: MasterConfig | None = None,
        backend: MetadataBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or MasterConfig()
        self._backend = IndexedObjects(backend or create_backend(self.config.metadata))
        self._clock = clock
        self._wall = wall_clock
        # Epochs grow across master restarts too (they start from the time), so a location
        # from before a restart never names a registration that exists after it.
        self._last_epoch = 0
        self.membership = 0
        self._lock = threading.RLock()
        self._nodes: dict[str, PoolNode] = {}
        self._ssd_leases: dict[SsdReplicaId, float] = {}
        # Where in its prompt each key a prefix match missed is (depth, blocks of the prompt),
        # for a policy that uses hints: the put of that key that follows touches it with them.
        self._hints: dict[str, tuple[int, int]] = {}
        self._uses_hints = POLICIES[self.config.eviction].uses_hints
        # Node ids that take no new objects (kvstore drain); kept across re-registration.
        self._draining: set[str] = set()
        # Locations handed to readers per node: the read choice spreads over replicas by it.
        self._reads: dict[str, int] = {}
        # Moves under way: (key, token) of the new replica -> the node whose replica it replaces.
        self._moves: dict[tuple[str, int], str] = {}
        # Slots of removed objects that were leased: freed only once the lease runs out, so a
        # reader mid-copy never sees the slot reused under it.
        self._zombies: list[tuple[str, int, float]] = []
        # Keys with a pending replica (a put, or a move beside sealed replicas).
        self._pending: set[str] = set()
        # Nodes' SSD tiers: their replicas are in the records, orders and hit counts here.
        self._ssd = SsdBook(self.config.spill_watermark, self.config.promote_after_hits,
                            self.config.tier_orders)
        # `puts` counts sealed puts (a move is a put); every started put ends sealed, aborted,
        # expired, or dropped with its node.
        self.hits = self.misses = self.evictions = self.puts = 0
        self.puts_started = self.puts_aborted = self.puts_expired = 0
        self.match_prefix_calls = self.blocks_matched = self.objects_recovered = 0
        self.events = EventLog()  # stored/removed/evicted/node events for WatchEvents

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The lock, and one commit of whatever the operation changed in the backend."""
        with self._lock:
            try:
                yield
            finally:
                self._backend.commit()

    def _new_node(self, info: NodeInfo, now: float, grant_key: bytes) -> PoolNode:
        allocator = SlabAllocator(info.segment_size, self.config.min_slot_bytes,
                                  self.config.slab_page_bytes, self.config.slab_classes)
        return PoolNode(info, allocator, now, grant_key, make_policy(self.config.eviction))

    def _hint(self, key: str) -> BlockHint:
        """Where `key` sits in its prompt, as far as a prefix match that missed it told."""
        got = self._hints.pop(key, None)
        return MIDDLE if got is None else BlockHint(got[0], got[0] == got[1] - 1)

    @staticmethod
    def _track(node: PoolNode, key: str, offset: int) -> None:
        node.seal(key, offset, MIDDLE)
        node.keys.add(key)
        node.by_offset[offset] = key

    def _lease_of(self, meta: ObjectMeta) -> float:
        """Until when the replica is leased (monotonic; 0.0: never was)."""
        if meta.tier == DRAM:
            node = self._nodes.get(meta.node_id)
            return 0.0 if node is None else node.leases.get(meta.key, 0.0)
        return self._ssd_leases.get((meta.key, meta.node_id), 0.0)

    def _drop_lease(self, meta: ObjectMeta) -> float:
        """Forget the replica's lease; until when it ran (0.0: none)."""
        if meta.tier == DRAM:
            node = self._nodes.get(meta.node_id)
            return 0.0 if node is None else node.leases.pop(meta.key, 0.0)
        return self._ssd_leases.pop((meta.key, meta.node_id), 0.0)


    def _allocate_evicting(self, node: PoolNode, size: int) -> tuple[int, int] | None:
        def evictable(offset: int) -> bool:
            key = node.by_offset.get(offset)
            return key is not None and key in node.offsets and self._evictable(key, node)

        plan = node.allocator.eviction_plan(
            size, map(node.offsets.__getitem__, node.eviction_order()), evictable)
        if plan is None:
            return None
        for offset in plan:
            self._evict(node, node.by_offset[offset])
        got = node.allocator.allocate(size)
        assert got is not None, "an eviction plan frees a slot or a page of the needed class"
        return got

    def _evictable(self, key: str, node: PoolNode) -> bool:
        return node.leases.get(key, 0.0) <= self._clock()

    def _evict(self, node: PoolNode, key: str) -> None:
        """Evict the replica of `key` on `node` (unleased: its slot is free at once)."""
        obj = self._backend.get(key)
        meta = None if obj is None else obj.on(node.info.node_id)
        assert obj is not None and meta is not None and meta.sealed, f"evicting {key}"
        self._unlink(obj, meta)
        node.unseal(key)
        node.keys.discard(key)
        node.by_offset.pop(meta.offset, None)
        node.leases.pop(key, None)
        node.allocator.free(meta.offset)
        self._spill_outlives(meta)
        self.evictions += 1
        self.events.emit(EventKind.EVICTED, key, node.info.node_id, meta.tier)

    def _spill_outlives(self, meta: ObjectMeta) -> None:
        """The DRAM replica `meta` is evicted: a copy of it to its node's SSD under way is kept
        when it lands (see `MasterTiers._spill_done`)."""
        ssd = self._ssd.nodes.get(meta.node_id)
        if ssd is not None and meta.key in ssd.spilling:
            ssd.evicted_while_spilling[meta.key] = meta.token

    def _enforce_watermark(self, node: PoolNode) -> None:
        alloc = node.allocator
        if alloc.capacity == 0 or alloc.used <= self.config.high_watermark * alloc.capacity:
            return
        target = self.config.low_watermark * alloc.capacity
        for key in list(node.eviction_order()):
            if alloc.used <= target:
                break
            if self._evictable(key, node):
                self._evict(node, key)

    def _unlink(self, obj: StoredObject, replica: ObjectMeta) -> StoredObject | None:
        """Take `replica` out of `obj` in the backend (the key goes with its last replica)."""
        rest = obj.without(replica)
        if rest is None:
            self._backend.delete(obj.key)
        else:
            self._backend.put(rest)
        if rest is None or not rest.pending:
            self._pending.discard(obj.key)
        if not replica.sealed:
            self._moves.pop((obj.key, replica.token), None)
        return rest

    def _delete(self, meta: ObjectMeta) -> None:
        """Remove one replica; a leased one's slot stays taken until its lease runs out."""
        obj = self._backend.get(meta.key)
        assert obj is not None and obj.on(meta.node_id, meta.tier) == meta, meta
        self._unlink(obj, meta)
        until = self._drop_lease(meta)
        if meta.tier == SSD:  # a file, not a slot: the node deletes it
            self._ssd.forget(meta.node_id, meta.key, delete_file=True)
            return
        node = self._nodes[meta.node_id]
        node.unseal(meta.key)
        node.keys.discard(meta.key)
        node.by_offset.pop(meta.offset, None)
        if until > self._clock():
            self._zombies.append((meta.node_id, meta.offset, until))
        else:
            node.allocator.free(meta.offset)

