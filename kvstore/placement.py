"""Where each key of one read lives, as columns: what the reader plans its transfers from.

A prefix match hands thousands of locations as columns (`kvstore.prefix_match.PrefixMatch`:
node index, offset and length arrays); a `BlockLocation` per key costs about 0.8 us to build,
as much as the whole match costs per key. So the reader works on columns: it groups the
indices by node, builds each node's transport ops from the offset and length columns, and
never makes an object per location. A `Placement` wraps a match's own columns without copying
them (`of_match`); a GetReplicas answer, already one message per key, is turned into columns
once (`of_locations`), and so is each failover round's handful of relocated keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.metadata import DRAM, BlockLocation, NodeInfo
from kvstore.prefix_match import PrefixMatch

# node_index of a key with no location (not stored, no replica left): a miss without a read.
NOWHERE = -1


@dataclass(frozen=True)
class Placement:
    """keys[i] lives at (offsets[i], lengths[i]) of node node_ids[node_index[i]], registration
    epochs[i] (that node's, nodes[node_index[i]].epoch, when `epochs` is empty), in tier
    tiers[i] (every one in DRAM when `tiers` is empty); node_index[i] == NOWHERE: nowhere.

    nodes[j] is None when the answer named node_ids[j] without its registration (dropped
    since the lookup): its locations are misses, failed over like any unreadable one.
    The columns are read-only views of what they came from."""

    keys: Sequence[str]
    node_ids: Sequence[str]
    nodes: Sequence[NodeInfo | None]
    node_index: Sequence[int]
    offsets: Sequence[int]
    lengths: Sequence[int]
    epochs: Sequence[int] = ()
    tiers: Sequence[str] = ()

    @staticmethod
    def of_match(match: PrefixMatch, n: int | None = None) -> Placement:
        """The first `n` (all when None) locations of `match`: its own columns, sliced only
        when `n` is fewer than it matched."""
        m = match
        if n is not None and n < m.matched:
            m = PrefixMatch(m.keys[:n], m.nodes, m.node_index[:n], m.offsets[:n],
                            m.lengths[:n], m.epochs[:n], m.tiers[:n])
        return Placement(m.keys, [x.node_id for x in m.nodes], m.nodes, m.node_index,
                         m.offsets, m.lengths, m.epochs, m.tiers)

    @staticmethod
    def of_locations(keys: Sequence[str], locations: Sequence[BlockLocation | None],
                     nodes: Sequence[NodeInfo]) -> Placement:
        """Columns of one location per key (None: nowhere) on `nodes` (the registrations
        the answer named). The epoch column is always there, so `by_node` checks each."""
        known = {x.node_id: x for x in nodes}
        at: dict[str, int] = {}
        node_index = [NOWHERE if loc is None else at.setdefault(loc.node_id, len(at))
                      for loc in locations]
        found = [loc for loc in locations if loc is not None]
        if len(found) < len(locations):  # a placeholder row per key that is nowhere
            nowhere = BlockLocation("", "", 0, 0, 0, DRAM)
            found = [nowhere if loc is None else loc for loc in locations]
        tiers = [x.tier for x in found]
        return Placement(keys, list(at), [known.get(i) for i in at], node_index,
                         [x.offset for x in found], [x.length for x in found],
                         [x.epoch for x in found],
                         [] if tiers.count(DRAM) == len(tiers) else tiers)

    def located(self, i: int) -> bool:
        return self.node_index[i] != NOWHERE

    def node_id(self, i: int) -> str:
        return self.node_ids[self.node_index[i]]

    def by_node(self, tier: str, n: int) -> list[tuple[NodeInfo, list[int]]]:
        """The indices (below `n`) of the locations in `tier` per node, of the registration
        the node is named in only: a location is read only from the registration it was
        handed out for."""
        nodes, node_index, epochs, tiers = self.nodes, self.node_index, self.epochs, self.tiers
        if not tiers and not epochs and len(nodes) == 1:
            # A match on one node, every location in DRAM and of the node's registration (the
            # usual hit; only a match leaves the epochs out): no step per key.
            node = nodes[0]
            return [] if tier != DRAM or node is None or n == 0 else [(node, list(range(n)))]
        groups: dict[int, list[int]] = {}
        for i in range(n):
            j = node_index[i]
            if j == NOWHERE:
                continue
            node = nodes[j]
            if (node is not None and (not epochs or epochs[i] == node.epoch)
                    and (tiers[i] if tiers else DRAM) == tier):
                groups.setdefault(j, []).append(i)
        return [(node, idxs) for j, idxs in groups.items() if (node := nodes[j]) is not None]
