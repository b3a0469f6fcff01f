"""Protobuf <-> domain conversions for the kvstore messages that more than one module converts.

One converter per message, at the edge: the master's servicer, the node's membership and the
client call these and work with the frozen dataclasses of `kvstore.metadata` beyond.
"""

from __future__ import annotations

from kvstore.events import EventGap, EventKind, PoolEvent
from kvstore.grants import WriteGrant
from kvstore.metadata import (
    DRAM,
    BlockLocation,
    DrainState,
    HeldObject,
    NodeInfo,
    NodeStatus,
    ObjectEntry,
    ObjectMeta,
    ObjectState,
    PoolStatus,
)
from kvstore.tiering import TierDone, TierOp, TierOrder
from pantry.v1 import kvstore_pb2 as pb


def node_to_proto(n: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=n.node_id, host_id=n.host_id, address=n.address,
                       segment_path=n.segment_path, segment_size=n.segment_size,
                       tcp_address=n.tcp_address, epoch=n.epoch, ssd_dir=n.ssd_dir,
                       ssd_bytes=n.ssd_bytes)


def node_from_proto(msg: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(node_id=msg.node_id, host_id=msg.host_id, address=msg.address,
                    segment_path=msg.segment_path, segment_size=msg.segment_size,
                    tcp_address=msg.tcp_address, epoch=msg.epoch, ssd_dir=msg.ssd_dir,
                    ssd_bytes=msg.ssd_bytes)


def held_to_proto(h: HeldObject) -> pb.HeldObject:
    return pb.HeldObject(key=h.key, offset=h.offset, length=h.length, tier=h.tier)


def held_from_proto(msg: pb.HeldObject) -> HeldObject:
    return HeldObject(key=msg.key, offset=msg.offset, length=msg.length, tier=msg.tier or DRAM)


def location_to_proto(m: ObjectMeta) -> pb.Location:
    return pb.Location(key=m.key, node_id=m.node_id, offset=m.offset, length=m.length,
                       epoch=m.epoch, tier=m.tier)


def location_from_proto(msg: pb.Location) -> BlockLocation:
    return BlockLocation(key=msg.key, node_id=msg.node_id, offset=msg.offset, length=msg.length,
                         epoch=msg.epoch, tier=msg.tier or DRAM)


def grant_to_proto(g: WriteGrant) -> pb.WriteGrant:
    return pb.WriteGrant(offset=g.offset, length=g.length, epoch=g.epoch, token=g.token,
                         expires_unix_ms=g.expires_unix_ms, mac=g.mac)


def grant_from_proto(msg: pb.WriteGrant) -> WriteGrant:
    return WriteGrant(offset=msg.offset, length=msg.length, epoch=msg.epoch, token=msg.token,
                      expires_unix_ms=msg.expires_unix_ms, mac=msg.mac)


def object_to_proto(m: ObjectMeta, leased: bool) -> pb.ObjectInfo:
    return pb.ObjectInfo(location=location_to_proto(m), sealed=m.state is ObjectState.SEALED,
                         leased=leased)


def object_from_proto(msg: pb.ObjectInfo) -> ObjectEntry:
    return ObjectEntry(location=location_from_proto(msg.location), sealed=msg.sealed,
                       leased=msg.leased)


def status_to_proto(s: PoolStatus) -> pb.StatusResponse:
    return pb.StatusResponse(
        nodes=[pb.NodeStatus(node=node_to_proto(n.node), capacity_bytes=n.capacity_bytes,
                             used_bytes=n.used_bytes, objects=n.objects,
                             heartbeat_age_s=n.heartbeat_age_s, draining=n.draining,
                             ssd_used_bytes=n.ssd_used_bytes, ssd_objects=n.ssd_objects)
               for n in s.nodes],
        capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes, objects=s.objects,
        hits=s.hits, misses=s.misses, evictions=s.evictions, puts=s.puts,
        membership=s.membership, leader_address=s.leader, role=s.role,
    )


def status_from_proto(msg: pb.StatusResponse) -> PoolStatus:
    nodes = tuple(NodeStatus(node=node_from_proto(n.node), capacity_bytes=n.capacity_bytes,
                             used_bytes=n.used_bytes, objects=n.objects,
                             heartbeat_age_s=n.heartbeat_age_s, draining=n.draining,
                             ssd_used_bytes=n.ssd_used_bytes, ssd_objects=n.ssd_objects)
                  for n in msg.nodes)
    return PoolStatus(nodes=nodes, capacity_bytes=msg.capacity_bytes, used_bytes=msg.used_bytes,
                      objects=msg.objects, hits=msg.hits, misses=msg.misses,
                      evictions=msg.evictions, puts=msg.puts, membership=msg.membership,
                      leader=msg.leader_address, role=msg.role)


def drain_to_proto(d: DrainState) -> pb.DrainResponse:
    return pb.DrainResponse(keys=list(d.keys), replicas=d.replicas, dropped=d.dropped,
                            draining=d.draining)


def drain_from_proto(node_id: str, msg: pb.DrainResponse) -> DrainState:
    return DrainState(node_id, msg.draining, tuple(msg.keys), msg.replicas, msg.dropped)


_TIER_OPS = {TierOp.SPILL: pb.TIER_OP_SPILL, TierOp.PROMOTE: pb.TIER_OP_PROMOTE,
             TierOp.DROP: pb.TIER_OP_DROP}
_TIER_OPS_BACK = {v: k for k, v in _TIER_OPS.items()}


def tier_order_to_proto(o: TierOrder) -> pb.TierOrder:
    return pb.TierOrder(op=_TIER_OPS[o.op], key=o.key, offset=o.offset, length=o.length,
                        token=o.token)


def tier_order_from_proto(msg: pb.TierOrder) -> TierOrder | None:
    """None for an op this node does not know (a newer master's)."""
    op = _TIER_OPS_BACK.get(msg.op)
    return None if op is None else TierOrder(op, msg.key, msg.offset, msg.length, msg.token)


def tier_report_to_proto(done: list[TierDone], dropped: list[str]) -> pb.TierReport:
    return pb.TierReport(done=[pb.TierDone(op=_TIER_OPS[d.op], key=d.key, token=d.token,
                                           ok=d.ok, length=d.length) for d in done],
                         ssd_dropped=dropped)


def tier_report_from_proto(msg: pb.TierReport) -> tuple[list[TierDone], list[str]]:
    done = [TierDone(_TIER_OPS_BACK[d.op], d.key, d.token, d.ok, d.length)
            for d in msg.done if d.op in _TIER_OPS_BACK]
    return done, list(msg.ssd_dropped)


def event_to_proto(e: PoolEvent | EventGap) -> pb.PoolEvent:
    if isinstance(e, EventGap):
        return pb.PoolEvent(run_id=e.run_id, gap=e.lost)
    return pb.PoolEvent(seq=e.seq, run_id=e.run_id, kind=e.kind.value, key=e.key,
                        node_id=e.node_id, tier=e.tier, time=e.time)


def event_from_proto(msg: pb.PoolEvent) -> PoolEvent | EventGap | None:
    """None for an event kind this client does not know (a newer master's)."""
    if msg.gap:
        return EventGap(msg.run_id, msg.gap)
    try:
        kind = EventKind(msg.kind)
    except ValueError:
        return None
    return PoolEvent(msg.seq, kind, msg.key, msg.node_id, msg.tier, msg.time, msg.run_id)
