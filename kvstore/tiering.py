"""Moving objects between a node's DRAM and SSD tiers: the orders, and which objects to move.

The master decides, the node executes (`kvstore.tier_worker`), heartbeats carry both ways, so
the master stays off the data path and no request waits for a disk. This module is pure: no
I/O, no clock, no locks; the master calls it under its own lock with what it knows.

- Spill: when a node's DRAM use passes `spill_watermark` (below the eviction watermark), its
  least recently used sealed DRAM objects that have no SSD copy yet are copied to its SSD tier,
  so DRAM eviction later drops a replica, not the object.
- Promote: an object whose only sealed replicas are on SSD and that was read
  `promote_after_hits` times gets a DRAM slot on its node again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class TierOp(enum.Enum):
    SPILL = "spill"      # sealed DRAM slot -> SSD file
    PROMOTE = "promote"  # SSD file -> pending DRAM slot
    DROP = "drop"        # delete the SSD file (the master no longer lists that replica)


@dataclass(frozen=True)
class TierOrder:
    op: TierOp
    key: str
    offset: int = 0
    length: int = 0
    # The token of the replica the order is about; echoed back in the report, so a report that
    # arrives after the object changed hands changes nothing.
    token: int = 0


@dataclass(frozen=True)
class TierDone:
    op: TierOp
    key: str
    token: int
    ok: bool
    length: int


@dataclass(frozen=True)
class SpillCandidate:
    key: str
    offset: int
    length: int
    token: int


def spill_candidates(lru: Iterable[SpillCandidate], used_bytes: int, capacity_bytes: int,
                     spill_watermark: float, in_flight: int, skip: Callable[[str], bool],
                     max_orders: int) -> list[SpillCandidate]:
    """The DRAM objects of one node to spill now, least recently used first.

    Nothing while DRAM use is at or under `spill_watermark`; otherwise the coldest objects not
    to `skip` (an SSD copy exists, a spill is under way), at most `max_orders` minus those
    `in_flight`, so one slow disk does not pile up orders."""
    if capacity_bytes <= 0 or used_bytes <= spill_watermark * capacity_bytes:
        return []
    room = max_orders - in_flight
    out: list[SpillCandidate] = []
    for cand in lru:
        if len(out) >= room:
            break
        if not skip(cand.key):
            out.append(cand)
    return out


def should_promote(ssd_hits: int, promote_after_hits: int, has_dram_copy: bool,
                   promoting: bool) -> bool:
    """Whether an SSD replica read `ssd_hits` times earns a DRAM slot now."""
    return (promote_after_hits > 0 and not has_dram_copy and not promoting
            and ssd_hits >= promote_after_hits)


@dataclass
class NodeSsd:
    """What the master knows of one node's SSD tier, beyond the replicas in its records."""

    capacity_bytes: int
    # SSD replicas on the node: key -> object bytes.
    keys: dict[str, int] = field(default_factory=dict)
    spilling: set[str] = field(default_factory=set)
    # Spilling keys whose DRAM replica was evicted before the copy landed: key -> that
    # replica's token. The file is still kept when it lands (the node checked its bytes).
    evicted_while_spilling: dict[str, int] = field(default_factory=dict)
    # Promotions under way: key -> the pending DRAM replica's token.
    promoting: dict[str, int] = field(default_factory=dict)
    # Reads served from an SSD replica since it was stored or last promoted.
    hits: dict[str, int] = field(default_factory=dict)
    # (key, DRAM replica token) the node refused to spill (its tier full, the slot reused):
    # not asked again for that replica.
    refused: set[tuple[str, int]] = field(default_factory=set)
    orders: list[TierOrder] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(self.keys.values())


class SsdBook:
    """The master's SSD bookkeeping for every node that has an SSD tier. No I/O and no lock:
    the master calls it under its own lock; the replicas themselves stay in its records."""

    def __init__(self, spill_watermark: float, promote_after_hits: int,
                 orders_per_heartbeat: int) -> None:
        self.spill_watermark = spill_watermark
        self.promote_after_hits = promote_after_hits
        self.orders_per_heartbeat = orders_per_heartbeat
        self.nodes: dict[str, NodeSsd] = {}
        self.spilled = self.promoted = self.dropped = 0

    def add_node(self, node_id: str, capacity_bytes: int) -> None:
        """A node (re)registered: what was known of its tier before is void."""
        if capacity_bytes > 0:
            self.nodes[node_id] = NodeSsd(capacity_bytes)
        else:
            self.nodes.pop(node_id, None)

    def drop_node(self, node_id: str) -> list[str]:
        """Forget the node; the keys of its SSD replicas, for the master to unlink."""
        ssd = self.nodes.pop(node_id, None)
        return [] if ssd is None else list(ssd.keys)

    def stored(self, node_id: str, key: str, nbytes: int) -> None:
        ssd = self.nodes[node_id]
        ssd.keys[key] = nbytes
        ssd.hits.pop(key, None)

    def forget(self, node_id: str, key: str, delete_file: bool) -> None:
        """The SSD replica of `key` on the node is gone from the records; with `delete_file`,
        the node is told to delete the file too (the replica was removed, not lost)."""
        ssd = self.nodes.get(node_id)
        if ssd is None:
            return
        ssd.keys.pop(key, None)
        ssd.hits.pop(key, None)
        if delete_file:
            ssd.orders.append(TierOrder(TierOp.DROP, key))
            self.dropped += 1

    def hit(self, node_id: str, key: str) -> None:
        ssd = self.nodes.get(node_id)
        if ssd is not None and key in ssd.keys:
            ssd.hits[key] = ssd.hits.get(key, 0) + 1

    def due_promotions(self, node_id: str) -> list[str]:
        """Keys of the node's SSD replicas read often enough to earn a DRAM slot again."""
        ssd = self.nodes.get(node_id)
        if ssd is None:
            return []
        return [k for k, n in ssd.hits.items()
                if should_promote(n, self.promote_after_hits, False, k in ssd.promoting)]

    def plan_spills(self, node_id: str, lru: Iterable[SpillCandidate], used_bytes: int,
                    capacity_bytes: int) -> None:
        """Order the spills `spill_candidates` picks among the node's sealed DRAM objects,
        least recently used first, skipping those on its SSD tier, under way, or refused."""
        ssd = self.nodes.get(node_id)
        if ssd is None:
            return
        picked = spill_candidates(
            (c for c in lru if (c.key, c.token) not in ssd.refused), used_bytes,
            capacity_bytes, self.spill_watermark, len(ssd.spilling),
            lambda key: key in ssd.keys or key in ssd.spilling, self.orders_per_heartbeat)
        for c in picked:
            ssd.spilling.add(c.key)
            ssd.orders.append(TierOrder(TierOp.SPILL, c.key, c.offset, c.length, c.token))

    def usage(self, node_id: str) -> tuple[int, int]:
        """(bytes, objects) of the node's SSD replicas."""
        ssd = self.nodes.get(node_id)
        return (0, 0) if ssd is None else (ssd.used_bytes, len(ssd.keys))

    def take_orders(self, node_id: str) -> list[TierOrder]:
        ssd = self.nodes.get(node_id)
        if ssd is None:
            return []
        out, ssd.orders = ssd.orders, []
        return out
