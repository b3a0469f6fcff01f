"""Protobuf <-> domain conversions for the kvstore messages that more than one module converts.

One converter per message, at the edge: the master's servicer, the node's membership and the
client call these and work with the frozen dataclasses of `kvstore.metadata` beyond.
"""

from __future__ import annotations

from kvstore.grants import WriteGrant
from kvstore.metadata import (
    BlockLocation,
    HeldObject,
    NodeInfo,
    NodeStatus,
    ObjectEntry,
    ObjectMeta,
    ObjectState,
    PoolStatus,
)
from pantry.v1 import kvstore_pb2 as pb


def node_to_proto(n: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=n.node_id, host_id=n.host_id, address=n.address,
                       segment_path=n.segment_path, segment_size=n.segment_size,
                       tcp_address=n.tcp_address, epoch=n.epoch)


def node_from_proto(msg: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(node_id=msg.node_id, host_id=msg.host_id, address=msg.address,
                    segment_path=msg.segment_path, segment_size=msg.segment_size,
                    tcp_address=msg.tcp_address, epoch=msg.epoch)


def held_to_proto(h: HeldObject) -> pb.HeldObject:
    return pb.HeldObject(key=h.key, offset=h.offset, length=h.length)


def held_from_proto(msg: pb.HeldObject) -> HeldObject:
    return HeldObject(key=msg.key, offset=msg.offset, length=msg.length)


def location_to_proto(m: ObjectMeta) -> pb.Location:
    return pb.Location(key=m.key, node_id=m.node_id, offset=m.offset, length=m.length,
                       epoch=m.epoch)


def location_from_proto(msg: pb.Location) -> BlockLocation:
    return BlockLocation(key=msg.key, node_id=msg.node_id, offset=msg.offset, length=msg.length,
                         epoch=msg.epoch)


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
                             heartbeat_age_s=n.heartbeat_age_s) for n in s.nodes],
        capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes, objects=s.objects,
        hits=s.hits, misses=s.misses, evictions=s.evictions, puts=s.puts,
        membership=s.membership,
    )


def status_from_proto(msg: pb.StatusResponse) -> PoolStatus:
    nodes = tuple(NodeStatus(node=node_from_proto(n.node), capacity_bytes=n.capacity_bytes,
                             used_bytes=n.used_bytes, objects=n.objects,
                             heartbeat_age_s=n.heartbeat_age_s) for n in msg.nodes)
    return PoolStatus(nodes=nodes, capacity_bytes=msg.capacity_bytes, used_bytes=msg.used_bytes,
                      objects=msg.objects, hits=msg.hits, misses=msg.misses,
                      evictions=msg.evictions, puts=msg.puts, membership=msg.membership)
