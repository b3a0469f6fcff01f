"""The master's domain logic: membership, placement, two-phase put, leases, eviction (by the
policy of `--eviction`, kvstore.eviction), replicas and drain.

Metadata only: the master hands out (node, offset, length) and never touches object bytes.
All methods are thread-safe (one lock; every operation is short and in memory).

An object is a key and its replicas, each on a distinct node (`kvstore.replicas` chooses where
they go and which one a reader gets). One put token covers all replicas of a put, and PutEnd
seals them together, so a reader never sees a put half sealed; a writer that failed to write
one replica aborts that replica alone first, and the put lives on in the others. Eviction,
removal and a dropped node take one replica each; the key goes with its last one. Leases are
per replica handed out. A drain moves each replica of a node with a replace put: the new
replica, once sealed, takes the old one's place in one step, and the old slot is freed when the
last lease on it runs out.

Every registration of a node opens a new epoch, carried in each of its locations, with a new
key for the write grants the node checks; every put gets a token that alone can seal or abort
it. A put that needs room evicts one object of its slab class, or the idlest whole pages of
other classes that make room (kvstore.slab_allocator), or nothing.

Recovery: the master rebuilds its allocators from the backend's records at start (a Redis
backend has them all; pending puts are reclaimed), and a node that registers again reports the
intact objects its segment holds, which the master adopts as sealed in the new epoch, so a
master restarted on the memory backend serves them again too.

The state lives in `kvstore.master_state.MasterState`; each concept is a mixin over it in a
module of its own (master_recovery, master_puts, master_reads, master_admin, master_tiers), and
this module composes them with membership and housekeeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvstore.config import MasterConfig
from kvstore.errors import UnknownNodeError
from kvstore.events import EventKind
from kvstore.grants import new_grant_key
from kvstore.master_admin import MasterAdmin
from kvstore.master_puts import MasterPuts, PutGrant, PutOutcome, Ticket
from kvstore.master_reads import MasterReads
from kvstore.master_recovery import MasterRecovery
from kvstore.master_tiers import MasterTiers
from kvstore.metadata import (
    DRAM,
    SSD,
    HeldObject,
    MetadataBackend,
    NodeInfo,
    NodeRecord,
    NodeStatus,
    PoolStatus,
)
from kvstore.slab_allocator import ClassStats

__all__ = ["Master", "MasterStats", "PutGrant", "PutOutcome", "Registration", "Ticket"]

log = logging.getLogger(__name__)


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


class Master(MasterRecovery, MasterPuts, MasterReads, MasterAdmin, MasterTiers):
    """The pool's master: every operation of the mixins, membership and housekeeping."""

    def __init__(
        self,
        config: MasterConfig | None = None,
        backend: MetadataBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(config, backend, clock, wall_clock)
        self._recover()

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
            key = new_grant_key()
            node = self._nodes[info.node_id] = self._new_node(info, self._clock(), key)
            self._backend.put_node(NodeRecord(info, key, info.node_id in self._draining))
            self.events.emit(EventKind.NODE_JOINED, node_id=info.node_id)
            self._ssd.add_node(info.node_id, info.ssd_bytes)
            adopted = (self._adopt(node, [h for h in held if h.tier == DRAM])
                       + self._adopt_ssd(node, [h for h in held if h.tier == SSD]))
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
            obj = self._backend.get(key)
            replica = None if obj is None else obj.on(node_id)
            assert obj is not None and replica is not None, f"{key} on {node_id}"
            self._unlink(obj, replica)  # its lease goes with the node
        for key in self._ssd.drop_node(node_id):
            self._forget_ssd(key, node_id, delete_file=False)
        self._zombies = [z for z in self._zombies if z[0] != node_id]
        self.membership += 1
        self.events.emit(EventKind.NODE_LEFT, node_id=node_id)
        log.warning("node %s dropped (%s) with %d objects", node_id, reason, len(node.keys))

    # ---- housekeeping -----------------------------------------------------------------------

    def reap(self) -> None:
        """Drop silent nodes, reclaim abandoned puts and expired zombie slots, apply watermarks."""
        with self._writing():
            now = self._clock()
            for node_id, node in list(self._nodes.items()):
                if now - node.last_heartbeat > self.config.node_timeout_s:
                    self._drop_node(node_id, reason="heartbeat timeout")
            for key in list(self._pending):
                obj = self._backend.get(key)
                assert obj is not None and obj.pending, key
                expired = [r for r in obj.pending if r.deadline <= now]
                for meta in expired:
                    log.warning("put of %s on %s abandoned; reclaiming", meta.key, meta.node_id)
                    self._delete(meta)
                self.puts_expired += len({m.token for m in expired})
            still: list[tuple[str, int, float]] = []
            for node_id, offset, until in self._zombies:
                if until <= now:
                    self._nodes[node_id].allocator.free(offset)
                else:
                    still.append((node_id, offset, until))
            self._zombies = still
            # Expired leases stay until their replica goes (they no longer protect it): a
            # node's `leases` never holds more keys than the node.
            for node in self._nodes.values():
                self._enforce_watermark(node)

    def status(self) -> PoolStatus:
        with self._lock:
            now = self._clock()
            nodes = tuple(
                NodeStatus(n.info, n.allocator.capacity, n.allocator.used, len(n.keys),
                           now - n.last_heartbeat, n.info.node_id in self._draining,
                           *self._ssd.usage(n.info.node_id))
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

    def slab_classes(self) -> dict[str, list[ClassStats]]:
        """Each node's live size classes, by node id (for /metrics)."""
        with self._lock:
            return {node_id: n.allocator.classes() for node_id, n in sorted(self._nodes.items())}

    def stats(self) -> MasterStats:
        with self._lock:
            now = self._clock()
            return MasterStats(
                puts_started=self.puts_started, puts_aborted=self.puts_aborted,
                puts_expired=self.puts_expired, match_prefix_calls=self.match_prefix_calls,
                blocks_matched=self.blocks_matched,
                active_leases=sum(1 for n in self._nodes.values()
                                  for until in n.leases.values() if until > now)
                + sum(1 for until in self._ssd_leases.values() if until > now),
                objects_recovered=self.objects_recovered,
            )

    def close(self) -> None:
        with self._writing():
            pass
        self._backend.close()
