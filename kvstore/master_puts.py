"""The two-phase put: PutStart places replicas on distinct nodes (evicting to make room when
needed) and fences each put with a token; PutEnd seals all its replicas at once; PutAbort gives
up pending ones. A move (a drain's replace put) is a put whose sealing replaces the replica it
moves."""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from kvstore.events import EventKind
from kvstore.eviction import MIDDLE
from kvstore.grants import WriteGrant, sign
from kvstore.master_state import MasterState, PoolNode
from kvstore.metadata import (
    ObjectMeta,
    ObjectState,
    StoredObject,
)
from kvstore.replicas import NodeView, placement_order

log = logging.getLogger(__name__)


class PutOutcome(enum.Enum):
    ALLOCATED = "allocated"
    EXISTS = "exists"
    IN_PROGRESS = "in_progress"
    NO_SPACE = "no_space"
    TOO_LARGE = "too_large"
    GONE = "gone"  # a move of a key with no sealed replica on the node any more


@dataclass(frozen=True)
class PutGrant:
    key: str
    outcome: PutOutcome
    # The first replica (the writer's host first), as before replicas existed.
    location: ObjectMeta | None = None
    grant: WriteGrant | None = None
    # Every replica to write, the first included; fewer than `wanted` when the pool has fewer
    # distinct nodes with room.
    replicas: tuple[tuple[ObjectMeta, WriteGrant], ...] = ()
    wanted: int = 1


# A ticket names a put by (key, token), and optionally one of its replicas by node id.
Ticket = tuple[str, int] | tuple[str, int, str]


class MasterPuts(MasterState):
    def put_start(
        self, keys: Sequence[str], sizes: Sequence[int], client_host_id: str = "",
        replicas: int = 0, replace_node: str = "",
    ) -> list[PutGrant]:
        """Allocate `replicas` (0: the pool's default) replicas per key on distinct nodes.
        With `replace_node`, a move instead: one new replica of each key sealed there, on a node
        holding none, that replaces the one on `replace_node` when it is sealed."""
        assert len(keys) == len(sizes), "keys and sizes must pair up"
        wanted = replicas or self.config.replicas
        grants: list[PutGrant] = []
        with self._writing():
            touched: set[str] = set()
            for key, size in zip(keys, sizes, strict=True):
                if replace_node:
                    grants.append(self._move_start(key, replace_node, touched))
                    continue
                existing = self._backend.get(key)
                if existing is not None:
                    grants.append(PutGrant(key, PutOutcome.EXISTS if existing.sealed
                                           else PutOutcome.IN_PROGRESS))
                    continue
                if size > self.config.max_object_bytes:
                    grants.append(PutGrant(key, PutOutcome.TOO_LARGE))
                    continue
                placed: list[tuple[PoolNode, int, int]] = []
                while len(placed) < wanted:
                    got = self._place(size, client_host_id if not placed else "",
                                      {p[0].info.node_id for p in placed})
                    if got is None:
                        break
                    placed.append(got)
                if not placed:
                    grants.append(PutGrant(key, PutOutcome.NO_SPACE))
                    continue
                token = secrets.randbits(63) + 1
                signed = tuple(self._allocated(key, size, token, p, touched) for p in placed)
                self._backend.put(StoredObject(key, tuple(m for m, _ in signed)))
                self.puts_started += 1
                grants.append(PutGrant(key, PutOutcome.ALLOCATED, signed[0][0], signed[0][1],
                                       signed, wanted))
            for node_id in touched:
                self._enforce_watermark(self._nodes[node_id])
        return grants

    def _allocated(self, key: str, size: int, token: int, placed: tuple[PoolNode, int, int],
                   touched: set[str]) -> tuple[ObjectMeta, WriteGrant]:
        """The pending replica of a put in a slot just allocated, and its write grant."""
        node, offset, slot = placed
        meta = ObjectMeta(key, node.info.node_id, offset, size, slot, ObjectState.PENDING,
                          self._clock() + self.config.put_timeout_s, node.info.epoch, token)
        self._pending.add(key)
        node.keys.add(key)
        node.by_offset[offset] = key
        touched.add(node.info.node_id)
        expires = int((self._wall() + self.config.put_timeout_s) * 1000)
        return meta, sign(node.grant_key, offset, size, node.info.epoch, token, expires)

    def _move_start(self, key: str, from_node: str, touched: set[str]) -> PutGrant:
        obj = self._backend.get(key)
        old = None if obj is None else obj.on(from_node)
        if obj is None or old is None or not old.sealed:
            return PutGrant(key, PutOutcome.GONE)
        if obj.pending:
            return PutGrant(key, PutOutcome.IN_PROGRESS)
        # A move takes free room only: evicting other objects for it would trade one object
        # for another (the drain drops it instead).
        placed = self._place(old.length, "", {r.node_id for r in obj.replicas}, evict=False)
        if placed is None:
            return PutGrant(key, PutOutcome.NO_SPACE)
        token = secrets.randbits(63) + 1
        meta, grant = self._allocated(key, old.length, token, placed, touched)
        self._backend.put(obj.with_replica(meta))
        self._moves[(key, token)] = from_node
        self.puts_started += 1
        return PutGrant(key, PutOutcome.ALLOCATED, meta, grant, ((meta, grant),), 1)

    def _place(self, size: int, client_host_id: str, exclude: Collection[str] = (),
               evict: bool = True) -> tuple[PoolNode, int, int] | None:
        """A slot on the first node in placement order with room, else (`evict`) one made by
        evicting on the first node where that works."""
        views = [NodeView(n.info.node_id, n.info.host_id, n.allocator.free_bytes,
                          n.info.node_id in self._draining) for n in self._nodes.values()]
        order = [self._nodes[i] for i in placement_order(views, client_host_id, True, exclude)]
        for node in order:
            got = node.allocator.allocate(size)
            if got is not None:
                return node, got[0], got[1]
        for node in order if evict else ():
            got = self._allocate_evicting(node, size)
            if got is not None:
                return node, got[0], got[1]
        return None

    def _replicas_of(self, ticket: Ticket) -> tuple[StoredObject | None, list[ObjectMeta]]:
        """The object a ticket names and its replicas of that put (on live nodes)."""
        key, token = ticket[0], ticket[1]
        node_id = ticket[2] if len(ticket) > 2 else ""
        obj = self._backend.get(key)
        if obj is None:
            return None, []
        return obj, [r for r in obj.replicas if r.token == token and r.node_id in self._nodes
                     and (not node_id or r.node_id == node_id)]

    def put_end(self, tickets: Sequence[Ticket]) -> list[bool]:
        """Seal each (key, token) put, all its replicas at once (or the one on a ticket's node);
        True only for the put that token was granted for (again True when that same put is
        already sealed). A reclaimed put's token seals nothing. A sealed move replaces the
        replica it moves in the same step."""
        out: list[bool] = []
        with self._writing():
            for ticket in tickets:
                obj, mine = self._replicas_of(ticket)
                if obj is None or not mine:
                    out.append(False)
                    continue
                pending = [r for r in mine if not r.sealed]
                hint = self._hint(obj.key) if pending else MIDDLE
                for r in pending:
                    obj = obj.with_replica(replace(r, state=ObjectState.SEALED, deadline=0.0))
                    self._nodes[r.node_id].seal(r.key, r.offset, hint)
                    self.events.emit(EventKind.STORED, r.key, r.node_id, r.tier)
                if pending:
                    self._backend.put(obj)
                    if not obj.pending:
                        self._pending.discard(obj.key)
                    self.puts += 1
                    moved_from = self._moves.pop((obj.key, pending[0].token), None)
                    old = None if moved_from is None else obj.on(moved_from)
                    if old is not None and old.sealed:
                        self._delete(old)
                        self.events.emit(EventKind.REMOVED, old.key, old.node_id, old.tier)
                out.append(True)
        return out

    def put_abort(self, tickets: Sequence[Ticket]) -> int:
        """Give up the pending replicas of these (key, token) puts (of one node, when a ticket
        names it); others are left alone. How many replicas were given up."""
        n = 0
        with self._writing():
            for ticket in tickets:
                _, mine = self._replicas_of(ticket)
                pending = [r for r in mine if not r.sealed]
                for r in pending:
                    self._delete(r)
                n += len(pending)
                obj, left = self._replicas_of(ticket[:2])
                if pending and not left:
                    self.puts_aborted += 1
        return n

