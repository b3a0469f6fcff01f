"""Where an object's replicas go and which one a reader gets: pure choices over the master's
view of its nodes (no I/O, no clock), so they are tested on hand-made pools.

Placement puts each replica of an object on a distinct node. The first goes to the writer's
own host when a node there has room (the writer copies through shared memory), each other one
to the emptiest node not holding one yet; a draining node takes none. A reader gets one sealed
replica per key: one on its own host first (shared memory again), else one on a node that is not
draining, else the node that has handed out the fewest locations (reads spread over the copies).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kvstore.metadata import ObjectMeta


@dataclass(frozen=True)
class NodeView:
    """What placement and read choice need to know of one node."""

    node_id: str
    host_id: str
    free_bytes: int
    draining: bool = False
    reads: int = 0  # locations of its replicas handed to readers so far


def placement_order(nodes: Sequence[NodeView], client_host_id: str, first: bool,
                    exclude: Collection[str] = ()) -> list[str]:
    """Node ids in the order one replica is tried: for the first replica the writer's host
    leads, then the emptiest; for the others, the emptiest. `exclude`d and draining nodes are
    left out (a node holds at most one replica of an object)."""
    def rank(n: NodeView) -> tuple[bool, int, str]:
        local = first and bool(client_host_id) and n.host_id == client_host_id
        return (not local, -n.free_bytes, n.node_id)

    return [n.node_id for n in sorted(nodes, key=rank)
            if not n.draining and n.node_id not in exclude]


def choose_replica(replicas: Sequence[ObjectMeta], nodes: dict[str, NodeView],
                   client_host_id: str) -> ObjectMeta | None:
    """The replica a reader on `client_host_id` gets, among sealed `replicas` whose node is in
    `nodes`; None when there is none."""
    live = [r for r in replicas if r.sealed and r.node_id in nodes]
    if not live:
        return None

    def rank(r: ObjectMeta) -> tuple[bool, bool, int, str]:
        n = nodes[r.node_id]
        local = bool(client_host_id) and n.host_id == client_host_id
        return (not local, n.draining, n.reads, n.node_id)

    return min(live, key=rank)
