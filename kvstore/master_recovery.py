"""Recovery: the master rebuilds its nodes and allocators from the backend's records at start
(a Redis backend has them all; pending puts are reclaimed), and adopts the intact objects a
registering node reports holding, so a master restarted on the memory backend serves them
again too."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

from kvstore.errors import InvalidKeyError
from kvstore.events import EventKind
from kvstore.limits import check_key
from kvstore.master_state import MasterState, PoolNode
from kvstore.metadata import (
    SSD,
    HeldObject,
    ObjectMeta,
    ObjectState,
    StoredObject,
)

log = logging.getLogger(__name__)


class MasterRecovery(MasterState):

    def _recover(self) -> None:
        """Rebuild nodes and allocators from the backend's records; reclaim pending puts."""
        with self._writing():
            now = self._clock()
            for rec in self._backend.nodes():
                # A node that died meanwhile is dropped after node_timeout_s like any other.
                self._nodes[rec.info.node_id] = self._new_node(rec.info, now, rec.grant_key)
                self._ssd.add_node(rec.info.node_id, rec.info.ssd_bytes)
                self._last_epoch = max(self._last_epoch, rec.info.epoch)
                if rec.draining:
                    self._draining.add(rec.info.node_id)
            for obj in list(self._backend.scan()):
                kept: list[ObjectMeta] = []
                for meta in obj.replicas:
                    node = self._nodes.get(meta.node_id)
                    if meta.tier == SSD:  # a file: no slot to reserve
                        if (meta.sealed and node is not None and meta.epoch == node.info.epoch
                                and meta.node_id in self._ssd.nodes):
                            self._ssd.stored(meta.node_id, meta.key, meta.length)
                            kept.append(meta)
                        continue
                    if (meta.sealed and node is not None and meta.epoch == node.info.epoch
                            and node.allocator.reserve(meta.offset, meta.length) is not None):
                        self._track(node, meta.key, meta.offset)
                        kept.append(meta)
                        self.events.emit(EventKind.STORED, meta.key, meta.node_id, meta.tier)
                self.puts_expired += len({m.token for m in obj.pending})
                if not kept:
                    self._backend.delete(obj.key)
                    continue
                self.objects_recovered += 1
                if len(kept) != len(obj.replicas):
                    self._backend.put(StoredObject(obj.key, tuple(kept)))
            if self._nodes:
                log.info("recovered %d nodes and %d objects from %s", len(self._nodes),
                         self.objects_recovered, self.config.metadata)


    def _adopt(self, node: PoolNode, held: Sequence[HeldObject]) -> int:
        """Take the objects a registering node holds as sealed replicas, each whose slot is
        free; how many were taken. A key stored elsewhere gets the held copy as one more replica
        (a key names its bytes, so both copies are the same object), unless a put of it is
        under way."""
        n = 0
        for obj in sorted(held, key=lambda h: h.offset):
            try:
                check_key(obj.key)
            except InvalidKeyError:
                continue
            existing = self._backend.get(obj.key)
            if existing is not None and (existing.pending
                                         or existing.on(node.info.node_id) is not None
                                         or existing.replicas[0].length != obj.length):
                continue
            slot = node.allocator.reserve(obj.offset, obj.length)
            if slot is None:
                continue
            meta = ObjectMeta(obj.key, node.info.node_id, obj.offset, obj.length, slot,
                              ObjectState.SEALED, 0.0, node.info.epoch, secrets.randbits(63) + 1)
            self._backend.put(StoredObject(obj.key, (meta,)) if existing is None
                              else existing.with_replica(meta))
            self._track(node, obj.key, obj.offset)
            self.events.emit(EventKind.STORED, obj.key, node.info.node_id, meta.tier)
            n += 1
        self.objects_recovered += n
        return n

