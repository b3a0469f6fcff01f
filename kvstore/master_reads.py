"""Reads: which sealed replica a reader gets, its lease (so the slot is not reused under the
reader) and its touch of the eviction policy; one key at a time, or a prefix match a column at
a time."""

from __future__ import annotations

from array import array
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import attrgetter

from kvstore.eviction import MIDDLE, BlockHint
from kvstore.master_state import MAX_HINTS, MasterState
from kvstore.metadata import (
    DRAM,
    SSD,
    NodeInfo,
    ObjectMeta,
    ObjectState,
)
from kvstore.object_index import LONE_FIELDS
from kvstore.replicas import NodeView, choose_replica

# The columns of the index's packed lone replicas (`kvstore.object_index.LONE_LOCATION`).
_WIDTH = len(LONE_FIELDS)
_OFF, _LEN, _NODE, _SLOT, _TOKEN = map(LONE_FIELDS.index,
                                       ("offset", "length", "node", "slot_bytes", "token"))
_OFFSET, _LENGTH = attrgetter("offset"), attrgetter("length")  # at C speed, over a column


@dataclass(frozen=True)
class PrefixRun:
    """A prefix match as the master answers it, read under one hold of its lock: the
    locations of `keys` (the matched ones, the leading run of those asked) as columns, the
    way the answer carries them, so that no Python object per key is made on the way out.

    `keys[i]` is at (nodes[node_index[i]], offsets[i], lengths[i]) of its node's current
    registration (nodes[...].epoch: a live node's replicas all carry it), in tier tiers[i]."""

    keys: Sequence[str]
    nodes: tuple[NodeInfo, ...]  # the nodes holding them, by id
    offsets: array[int]  # "Q"
    lengths: array[int]  # "Q"
    node_index: array[int] | None  # "I"; None: every location is on nodes[0]
    tiers: tuple[str, ...]  # () when every location is in DRAM
    # The rest of each replica, for `replicas`: the lone ones' packed fields (`_WIDTH` per
    # replica, those of the leading keys), then the replicas of the keys after them.
    lone: array[int]
    rest: tuple[ObjectMeta, ...]

    def __post_init__(self) -> None:
        n = len(self.keys)
        assert len(self.offsets) == len(self.lengths) == n, "one location per matched key"
        assert self.node_index is None or len(self.node_index) == n, "one node per location"
        assert not self.tiers or len(self.tiers) == n, "one tier per location, or none"
        assert len(self.lone) // _WIDTH + len(self.rest) == n, "one replica per location"

    @property
    def matched(self) -> int:
        return len(self.keys)

    @property
    def dram_only(self) -> bool:
        return not self.tiers

    @cached_property
    def replicas(self) -> tuple[ObjectMeta, ...]:
        """One replica per matched key, in order (built only for a caller that asks)."""
        n = len(self.lone) // _WIDTH
        at = self.node_index or repeat(0)
        lone = (ObjectMeta(key, self.nodes[i].node_id, off, length, slot, ObjectState.SEALED,
                           0.0, self.nodes[i].epoch, token, DRAM)
                for key, i, off, length, slot, token in zip(
                    self.keys[:n], at, self.offsets, self.lengths, self.lone[_SLOT::_WIDTH],
                    self.lone[_TOKEN::_WIDTH], strict=False))
        return (*lone, *self.rest)


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

    def _lease_and_touch_lone(self, keys: Sequence[str], numbers: array[int], asked: int,
                              now: float) -> set[str]:
        """`_lease_and_touch` of the lone replicas of `keys`, the first of a prefix match of
        `asked` keys, on the nodes numbered `numbers` (the index's): a few dict updates at C
        speed when they are all on one node (the usual case). Every lease runs lease_ms from
        the monotonic clock, so a new one never ends before one already held: no max() needed,
        unlike one at a time. The ids of the nodes that hold them."""
        until = now + self.config.lease_ms / 1000.0
        if not keys:
            return set()
        node_id_of = self._backend.node_id_of
        # One node in the pool, or every replica on the first one's: nothing more to look up.
        if len(self._nodes) == 1 or numbers.count(numbers[0]) == len(numbers):
            node_id = node_id_of(numbers[0])
            node = self._nodes[node_id]
            node.leases.update(zip(keys, repeat(until)))
            node.order.touch_many(keys, 0, asked)
            self._reads[node_id] = self._reads.get(node_id, 0) + len(keys)
            return {node_id}
        node_ids = list(map(node_id_of, numbers))
        for i, (key, node_id) in enumerate(zip(keys, node_ids, strict=True)):
            node = self._nodes[node_id]
            node.leases[key] = until
            node.order.touch(key, BlockHint(i, i == asked - 1))
            self._reads[node_id] = self._reads.get(node_id, 0) + 1
        return set(node_ids)

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
        looked up, leased and touched and its columns built at C speed, from the index's
        packed replicas; what follows it, key by key, as long as it is sealed."""
        with self._lock:
            now = self._clock()
            lone = array("Q")
            lone.frombytes(self._backend.lone_run(keys))
            n = len(lone) // _WIDTH
            numbers = lone[_NODE::_WIDTH]
            holders = self._lease_and_touch_lone(keys[:n], numbers, len(keys), now)
            rest: list[ObjectMeta] = []
            for i in range(n, len(keys)):
                meta = self._sealed(keys[i], client_host_id)
                if meta is None:
                    break
                self._lease_and_touch(meta, now, BlockHint(i, i == len(keys) - 1))
                rest.append(meta)
                holders.add(meta.node_id)
            matched = n + len(rest)
            if self._uses_hints and matched < len(keys):
                # The keys missed are about to be put: their puts touch them with these.
                if len(self._hints) > MAX_HINTS:
                    self._hints.clear()
                depths = range(matched, len(keys))
                self._hints.update(zip(keys[matched:], zip(depths, repeat(len(keys)),
                                                           strict=False), strict=True))
            self.match_prefix_calls += 1
            self.blocks_matched += matched
            # A live node's replicas all carry its current epoch (a new registration drops
            # the old one's), so these are the epochs of the locations too.
            ids = sorted(holders)
            nodes = tuple(self._nodes[x].info for x in ids)
            node_index = None
            if len(ids) > 1:
                at = dict(zip(ids, range(len(ids)), strict=True))
                # Numbers of nodes that hold none of these (0) are never looked up.
                by_number = [at.get(self._backend.node_id_of(i), 0)
                             for i in range(max(numbers, default=-1) + 1)]
                node_index = array("I", map(by_number.__getitem__, numbers))
                node_index.extend(at[m.node_id] for m in rest)
        offsets, lengths = lone[_OFF::_WIDTH], lone[_LEN::_WIDTH]
        offsets.extend(map(_OFFSET, rest))
        lengths.extend(map(_LENGTH, rest))
        tiers: tuple[str, ...] = ()
        if any(m.tier != DRAM for m in rest):
            tiers = (DRAM,) * n + tuple(m.tier for m in rest)
        return PrefixRun(keys[:matched], nodes, offsets, lengths, node_index, tiers, lone,
                         tuple(rest))

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

