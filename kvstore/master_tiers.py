"""The master's side of the SSD tiers: adopting a node's files, its tiering reports, and the
orders it gets back in heartbeat answers (`kvstore.tiering` picks what to spill and promote).

A mixin of `kvstore.master.Master` over `kvstore.master_state.MasterState`: its methods run
under the master's lock and work on its records, like the master's own. An SSD replica is
a record of tier "ssd" beside the key's DRAM replicas (offset 0, no slot), so reads, removal
and eviction treat it as one more replica; a node's SSD tier evicts by its own watermarks and
reports what went, and the master never waits for a disk.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import replace

from kvstore.errors import InvalidKeyError
from kvstore.events import EventKind
from kvstore.eviction import MIDDLE
from kvstore.limits import check_key
from kvstore.master_state import MasterState, PoolNode
from kvstore.metadata import (
    DRAM,
    SSD,
    HeldObject,
    ObjectMeta,
    ObjectState,
    StoredObject,
)
from kvstore.tiering import SpillCandidate, TierDone, TierOp, TierOrder


class MasterTiers(MasterState):
    """SSD-tier operations of the master (see the module's docstring)."""

    def tier_counts(self) -> dict[str, int]:
        """Copies between tiers since the master started (for /metrics): spills recorded,
        promotions sealed, SSD files the master told nodes to delete."""
        with self._writing():
            return {"spilled": self._ssd.spilled, "promoted": self._ssd.promoted,
                    "ssd_deleted": self._ssd.dropped}

    def _adopt_ssd(self, node: PoolNode, held: Sequence[HeldObject]) -> int:
        """Take the files a registering node's SSD tier holds as sealed SSD replicas (beside
        any other replica of the key: a key names its bytes); how many were taken."""
        node_id, n = node.info.node_id, 0
        if node_id not in self._ssd.nodes:
            return 0
        for h in held:
            try:
                check_key(h.key)
            except InvalidKeyError:
                continue
            existing = self._backend.get(h.key)
            if existing is not None and (existing.pending or existing.on(node_id, SSD)
                                         or existing.replicas[0].length != h.length):
                continue
            meta = ObjectMeta(h.key, node_id, 0, h.length, 0, ObjectState.SEALED, 0.0,
                              node.info.epoch, secrets.randbits(63) + 1, SSD)
            self._backend.put(StoredObject(h.key, (meta,)) if existing is None
                              else existing.with_replica(meta))
            self._ssd.stored(node_id, h.key, h.length)
            self.events.emit(EventKind.STORED, h.key, node_id, SSD)
            n += 1
        self.objects_recovered += n
        return n

    def _forget_ssd(self, key: str, node_id: str, delete_file: bool) -> bool:
        """The SSD replica of `key` on the node is gone (or to go): out of the records. False
        when the records had none (a file the master had already let go of)."""
        obj = self._backend.get(key)
        meta = None if obj is None else obj.on(node_id, SSD)
        if obj is not None and meta is not None:
            self._unlink(obj, meta)
            self._drop_lease(meta)
        self._ssd.forget(node_id, key, delete_file)
        return meta is not None

    def tier_heartbeat(self, node_id: str, epoch: int, done: Sequence[TierDone] = (),
                       dropped: Sequence[str] = ()) -> list[TierOrder]:
        """Take a node's tiering report (spills and promotions done, SSD files gone) and hand
        it its next orders; none for a registration that is not current."""
        with self._writing():
            node = self._nodes.get(node_id)
            ssd = self._ssd.nodes.get(node_id)
            if node is None or node.info.epoch != epoch or ssd is None:
                return []
            for d in done:
                if d.op is TierOp.SPILL:
                    self._spill_done(node, d)
                elif d.op is TierOp.PROMOTE:
                    self._promote_done(node, d)
            for key in dropped:
                if self._forget_ssd(key, node_id, delete_file=False):
                    self.events.emit(EventKind.EVICTED, key, node_id, SSD)
            if dropped:
                ssd.refused.clear()  # room again: what was refused may fit now
            self._plan_promotions(node)
            alloc = node.allocator

            def cold() -> Iterator[SpillCandidate]:
                for key in node.eviction_order():
                    if key in ssd.keys or key in ssd.spilling:
                        continue  # cheap first: most of a spilling node's coldest are copied
                    offset = node.offsets[key]
                    obj = self._backend.get(key)
                    meta = None if obj is None else obj.on(node_id)
                    if meta is not None:
                        yield SpillCandidate(key, offset, meta.length, meta.token)

            self._ssd.plan_spills(node_id, cold(), alloc.used, alloc.capacity)
            return self._ssd.take_orders(node_id)

    def _spill_done(self, node: PoolNode, d: TierDone) -> None:
        node_id = node.info.node_id
        ssd = self._ssd.nodes[node_id]
        ssd.spilling.discard(d.key)
        evicted = ssd.evicted_while_spilling.pop(d.key, None) == d.token
        if not d.ok:
            ssd.refused.add((d.key, d.token))
            return
        obj = self._backend.get(d.key)
        if obj is not None and obj.on(node_id, SSD) is not None:
            return
        dram = None if obj is None else obj.on(node_id)
        copied = dram is not None and dram.token == d.token and dram.length == d.length
        # DRAM eviction overtook the copy: the file still holds the key's bytes (the node
        # checked them before writing), so it is kept unless the key now names other lengths.
        kept = evicted and (obj is None or all(r.length == d.length for r in obj.replicas))
        if not (copied or kept):
            # The replica it was copied from is gone: the file belongs to no listed replica.
            ssd.orders.append(TierOrder(TierOp.DROP, d.key))
            return
        meta = ObjectMeta(d.key, node_id, 0, d.length, 0, ObjectState.SEALED, 0.0,
                          node.info.epoch, d.token, SSD)
        self._backend.put(StoredObject(d.key, (meta,)) if obj is None
                          else obj.with_replica(meta))
        self._ssd.stored(node_id, d.key, d.length)
        self.events.emit(EventKind.STORED, d.key, node_id, SSD)
        self._ssd.spilled += 1

    def _promote_done(self, node: PoolNode, d: TierDone) -> None:
        ssd = self._ssd.nodes[node.info.node_id]
        if ssd.promoting.get(d.key) == d.token:
            del ssd.promoting[d.key]
        obj = self._backend.get(d.key)
        meta = None if obj is None else obj.on(node.info.node_id)
        if obj is None or meta is None or meta.sealed or meta.token != d.token:
            return  # reclaimed meanwhile (put_timeout_s)
        if not d.ok or not obj.sealed:  # failed, or the object was removed meanwhile
            self._delete(meta)
            return
        obj = obj.with_replica(replace(meta, state=ObjectState.SEALED, deadline=0.0))
        self._backend.put(obj)
        if not obj.pending:
            self._pending.discard(d.key)
        node.seal(d.key, meta.offset, MIDDLE)
        self._ssd.promoted += 1
        self.events.emit(EventKind.STORED, d.key, node.info.node_id, DRAM)

    def _plan_promotions(self, node: PoolNode) -> None:
        """A pending DRAM slot on the node, and an order to fill it, for each SSD replica read
        promote_after_hits times whose key has no DRAM replica anywhere."""
        node_id = node.info.node_id
        ssd = self._ssd.nodes[node_id]
        for key in self._ssd.due_promotions(node_id):
            ssd.hits.pop(key, None)
            obj = self._backend.get(key)
            meta = None if obj is None else obj.on(node_id, SSD)
            if (obj is None or meta is None or obj.pending
                    or any(r.tier == DRAM for r in obj.sealed)):
                continue
            got = (node.allocator.allocate(meta.length)
                   or self._allocate_evicting(node, meta.length))
            if got is None:
                continue
            offset, slot = got
            token = secrets.randbits(63) + 1
            self._backend.put(obj.with_replica(ObjectMeta(
                key, node_id, offset, meta.length, slot, ObjectState.PENDING,
                self._clock() + self.config.put_timeout_s, node.info.epoch, token)))
            self._pending.add(key)
            node.keys.add(key)
            node.by_offset[offset] = key
            ssd.promoting[key] = token
            ssd.orders.append(TierOrder(TierOp.PROMOTE, key, offset, meta.length, token))
