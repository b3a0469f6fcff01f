"""Reads: which sealed replica a reader gets, its lease (so the slot is not reused under the
reader) and its touch of the eviction policy; one key at a time, or a prefix match a column at
a time."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from types import NoneType
from typing import cast

from kvstore.eviction import MIDDLE, BlockHint
from kvstore.master_state import MAX_HINTS, MasterState
from kvstore.metadata import (
    DRAM,
    SSD,
    NodeInfo,
    ObjectMeta,
)
from kvstore.replicas import NodeView, choose_replica

_NODE_ID = attrgetter("node_id")  # at C speed, over thousands of replicas at once


@dataclass(frozen=True)
class PrefixRun:
    """A prefix match as the master answers it, read under one hold of its lock."""

    replicas: Sequence[ObjectMeta]  # one per matched key, in order
    nodes: tuple[NodeInfo, ...]  # the nodes holding them, by id: each replica's epoch is its
    dram_only: bool  # every replica is in DRAM


class MasterReads(MasterState):
    def _sealed(self, key: str, client_host_id: str = "",
                exclude: Collection[str] = ()) -> ObjectMeta | None:
        """The sealed replica of `key` a reader on `client_host_id` gets, on none of the
        `exclude`d nodes (the reader failed to read them); None: a miss."""
        obj = self._backend.get(key)
        if obj is None:
            return None
        views = {}
        for r in obj.sealed:
            node = self._nodes.get(r.node_id)
            if node is not None and r.node_id not in exclude:
                views[r.node_id] = NodeView(r.node_id, node.info.host_id, 0,
                                            r.node_id in self._draining,
                                            self._reads.get(r.node_id, 0))
        # A DRAM replica anywhere comes before an SSD one: memory serves the read.
        return (choose_replica([r for r in obj.sealed if r.tier == DRAM], views,
                               client_host_id)
                or choose_replica(obj.sealed, views, client_host_id))

    def _lease_and_touch(self, meta: ObjectMeta, now: float, hint: BlockHint = MIDDLE) -> None:
        until = now + self.config.lease_ms / 1000.0
        if meta.tier == SSD:
            rid = (meta.key, meta.node_id)
            self._ssd_leases[rid] = max(until, self._ssd_leases.get(rid, 0.0))
            self._ssd.hit(meta.node_id, meta.key)  # counts toward its promotion
        else:
            node = self._nodes[meta.node_id]
            node.leases[meta.key] = max(until, node.leases.get(meta.key, 0.0))
            node.order.touch(meta.key, hint)
        self._reads[meta.node_id] = self._reads.get(meta.node_id, 0) + 1

    def _lease_and_touch_lone(self, metas: list[ObjectMeta], keys: Sequence[str],
                              now: float) -> set[str]:
        """`_lease_and_touch` of `metas`, the lone replicas of the first keys of a prefix match
        of `keys`: a few dict updates at C speed when they are all on one node (the usual
        case). Every lease runs lease_ms from the monotonic clock, so a new one never ends
        before one already held: no max() needed, unlike one at a time. The ids of the nodes
        that hold them."""
        until = now + self.config.lease_ms / 1000.0
        if not metas:
            return set()
        if len(self._nodes) == 1:  # a pool of one node: no need to look
            node_ids, holders = [], {metas[0].node_id}
        else:
            node_ids = list(map(_NODE_ID, metas))
            holders = set(node_ids)
        if len(holders) == 1:
            node_id = metas[0].node_id
            node = self._nodes[node_id]
            run = keys[: len(metas)]
            node.leases.update(zip(run, repeat(until)))
            node.order.touch_many(run, 0, len(keys))
            self._reads[node_id] = self._reads.get(node_id, 0) + len(run)
            return holders
        for i, (key, node_id) in enumerate(zip(keys, node_ids, strict=False)):
            node = self._nodes[node_id]
            node.leases[key] = until
            node.order.touch(key, BlockHint(i, i == len(keys) - 1))
            self._reads[node_id] = self._reads.get(node_id, 0) + 1
        return holders

    def get_replicas(self, keys: Sequence[str], client_host_id: str = "",
                     exclude: Collection[str] = ()) -> list[ObjectMeta | None]:
        """One sealed replica per key (same host first; leased for lease_ms, touched), on
        none of the `exclude`d nodes; None per missing key."""
        out: list[ObjectMeta | None] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                meta = self._sealed(key, client_host_id, exclude)
                if meta is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self._lease_and_touch(meta, now, self._hint(key))
                out.append(meta)
        return out

    def match_prefix(self, keys: Sequence[str], client_host_id: str = "") -> list[ObjectMeta]:
        """Locations of the longest run of leading sealed keys (`match_run`'s replicas)."""
        return list(self.match_run(keys, client_host_id).replicas)

    def match_run(self, keys: Sequence[str], client_host_id: str = "") -> PrefixRun:
        """Locations of the longest run of leading sealed keys, one replica each (same host
        first; leased and touched), and their nodes as they are now.

        Engines ask for thousands of keys at once (8,192 for a 128k-token prompt), so the
        leading run of objects with a lone replica (nothing to choose: the usual case) is
        looked up, leased and touched a column at a time at C speed; what follows it, key by
        key, as long as it is sealed."""
        with self._lock:
            now = self._clock()
            out = self._backend.lone_many(keys)
            kinds = list(map(type, out))
            if NoneType in kinds:
                del out[kinds.index(NoneType):]
            metas = cast(list[ObjectMeta], out)
            holders = self._lease_and_touch_lone(metas, keys, now)
            dram_only = True
            for i in range(len(metas), len(keys)):
                meta = self._sealed(keys[i], client_host_id)
                if meta is None:
                    break
                self._lease_and_touch(meta, now, BlockHint(i, i == len(keys) - 1))
                metas.append(meta)
                holders.add(meta.node_id)
                dram_only = dram_only and meta.tier == DRAM
            if self._uses_hints and len(metas) < len(keys):
                # The keys missed are about to be put: their puts touch them with these.
                if len(self._hints) > MAX_HINTS:
                    self._hints.clear()
                n = len(keys)
                depths = range(len(metas), n)
                self._hints.update(zip(keys[len(metas):], zip(depths, repeat(n), strict=False),
                                       strict=True))
            self.match_prefix_calls += 1
            self.blocks_matched += len(metas)
            # A live node's replicas all carry its current epoch (a new registration drops
            # the old one's), so these are the epochs of `metas` too.
            nodes = tuple(self._nodes[n].info for n in sorted(holders))
        return PrefixRun(metas, nodes, dram_only)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [self._sealed(k) is not None for k in keys]

    def list_objects(self, prefix: str = "", limit: int = 100) -> tuple[list[tuple[ObjectMeta,
                                                                                   bool]], bool]:
        """(replicas with their leased flag, truncated) in key order, a key's replicas in the
        order they were placed."""
        with self._lock:
            now = self._clock()
            out: list[tuple[ObjectMeta, bool]] = []
            for obj in self._backend.scan(prefix):
                for meta in obj.replicas:
                    if len(out) >= limit:
                        return out, True
                    out.append((meta, self._lease_of(meta) > now))
            return out, False

