"""Operator commands on the pool's contents: remove keys, evict (by bytes, prefix or all) and
drain a node (`kvstore rm`, `kvstore evict`, `kvstore drain`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvstore.errors import UnknownNodeError
from kvstore.events import EventKind
from kvstore.master_state import MasterState
from kvstore.metadata import (
    DrainState,
    NodeRecord,
)

log = logging.getLogger(__name__)


class MasterAdmin(MasterState):
    def remove(self, keys: Sequence[str]) -> int:
        """Remove sealed objects, every replica; pending puts are left to finish or time out."""
        n = 0
        with self._writing():
            for key in keys:
                obj = self._backend.get(key)
                sealed = () if obj is None else obj.sealed
                for meta in sealed:
                    self._delete(meta)
                    self.events.emit(EventKind.REMOVED, key, meta.node_id, meta.tier)
                n += bool(sealed)
        return n

    def evict(self, nbytes: int = 0, prefix: str | None = None) -> tuple[int, int]:
        """Evict sealed objects: every one whose key starts with `prefix` ("": all of them),
        or, with no prefix, the eviction policy's first victims of the fullest nodes first until
        their slots add up to `nbytes`. A leased object's slot stays taken until its lease ends.
        (replicas, slot bytes) evicted."""
        with self._writing():
            if prefix is not None:
                victims = [m for obj in self._backend.scan(prefix) for m in obj.sealed]
            else:
                victims, total = [], 0
                for node in sorted(self._nodes.values(),
                                   key=lambda n: (-n.allocator.used, n.info.node_id)):
                    for key in node.eviction_order():
                        if total >= nbytes:
                            break
                        obj = self._backend.get(key)
                        meta = None if obj is None else obj.on(node.info.node_id)
                        assert meta is not None, key
                        victims.append(meta)
                        total += meta.slot_bytes
                        self._spill_outlives(meta)
            for meta in victims:
                self._delete(meta)
                self.events.emit(EventKind.EVICTED, meta.key, meta.node_id, meta.tier)
            self.evictions += len(victims)
            return len(victims), sum(m.slot_bytes for m in victims)


    def drain(self, node_id: str, limit: int = 1024, drop: Sequence[str] = (),
              cancel: bool = False) -> DrainState:
        """Mark the node draining (no new objects go to it) and list up to `limit` of its sealed
        keys still to move, the eviction policy's first victims first; first give up its
        replicas of the keys in `drop` (they found no room elsewhere). `cancel`: it takes new
        objects again."""
        with self._writing():
            node = self._nodes.get(node_id)
            if node is None:
                raise UnknownNodeError(f"unknown node {node_id!r}")
            if cancel:
                self._draining.discard(node_id)
                self._backend.put_node(NodeRecord(node.info, node.grant_key, False))
                return DrainState(node_id, False, (), len(node.keys), 0)
            if node_id not in self._draining:
                log.info("node %s draining: no new objects go to it", node_id)
                self._draining.add(node_id)
                self._backend.put_node(NodeRecord(node.info, node.grant_key, True))
            dropped = 0
            for key in drop:
                obj = self._backend.get(key)
                meta = None if obj is None else obj.on(node_id)
                if obj is not None and meta is not None and meta.sealed and not obj.pending:
                    self._delete(meta)
                    dropped += 1
            keys: list[str] = []
            for key in node.eviction_order():
                if len(keys) >= limit:
                    break
                obj = self._backend.get(key)
                if obj is not None and not obj.pending:
                    keys.append(key)
            return DrainState(node_id, True, tuple(keys), len(node.keys), dropped)

