"""gRPC edge of the master: converts protobuf <-> domain types around `Master`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.config import MasterConfig
from kvstore.errors import UnknownNodeError
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo, ObjectMeta, PoolStatus
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_OUTCOME = {
    PutOutcome.ALLOCATED: pb.PUT_STATE_ALLOCATED,
    PutOutcome.EXISTS: pb.PUT_STATE_EXISTS,
    PutOutcome.IN_PROGRESS: pb.PUT_STATE_IN_PROGRESS,
    PutOutcome.NO_SPACE: pb.PUT_STATE_NO_SPACE,
    PutOutcome.TOO_LARGE: pb.PUT_STATE_TOO_LARGE,
}


def node_to_pb(n: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=n.node_id, host_id=n.host_id, address=n.address,
                       segment_path=n.segment_path, segment_size=n.segment_size,
                       tcp_address=n.tcp_address)


def node_from_pb(n: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(n.node_id, n.host_id, n.address, n.segment_path, n.segment_size,
                    n.tcp_address)


def _loc(m: ObjectMeta) -> pb.Location:
    return pb.Location(key=m.key, node_id=m.node_id, offset=m.offset, length=m.length)


def status_to_pb(s: PoolStatus) -> pb.StatusResponse:
    return pb.StatusResponse(
        nodes=[pb.NodeStatus(node=node_to_pb(n.node), capacity_bytes=n.capacity_bytes,
                             used_bytes=n.used_bytes, objects=n.objects,
                             heartbeat_age_s=n.heartbeat_age_s) for n in s.nodes],
        capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes, objects=s.objects,
        hits=s.hits, misses=s.misses, evictions=s.evictions, puts=s.puts,
    )


class MasterServicer(pb_grpc.KVMasterServicer):
    def __init__(self, master: Master) -> None:
        self.master = master

    def _nodes_of(self, metas: Iterable[ObjectMeta | None]) -> list[pb.NodeInfo]:
        out = []
        for node_id in sorted({m.node_id for m in metas if m is not None}):
            try:
                out.append(node_to_pb(self.master.node(node_id)))
            except UnknownNodeError:
                # Dropped since the lookup: its locations are misses for the client.
                continue
        return out

    def RegisterNode(self, request: pb.RegisterNodeRequest,
                     context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        if not request.node.node_id or not request.node.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id and address are required")
        self.master.register_node(node_from_pb(request.node))
        return pb.RegisterNodeResponse(node_timeout_s=self.master.config.node_timeout_s)

    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(known=self.master.heartbeat(request.node_id))

    def PutStart(self, request: pb.PutStartRequest,
                 context: grpc.ServicerContext) -> pb.PutStartResponse:
        if len(request.keys) != len(request.sizes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "keys and sizes differ in length")
        grants = self.master.put_start(request.keys, request.sizes, request.client_host_id)
        slots = []
        for g in grants:
            slot = pb.PutSlot(state=_OUTCOME[g.outcome])
            if g.location is not None:
                slot.location.CopyFrom(_loc(g.location))
            slots.append(slot)
        nodes = self._nodes_of(g.location for g in grants)
        return pb.PutStartResponse(slots=slots, nodes=nodes,
                                   max_object_bytes=self.master.config.max_object_bytes)

    def PutEnd(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.PutEndResponse:
        return pb.PutEndResponse(sealed=self.master.put_end(request.keys))

    def PutAbort(self, request: pb.KeysRequest,
                 context: grpc.ServicerContext) -> pb.PutAbortResponse:
        return pb.PutAbortResponse(aborted=self.master.put_abort(request.keys))

    def GetReplicas(self, request: pb.KeysRequest,
                    context: grpc.ServicerContext) -> pb.GetReplicasResponse:
        metas = self.master.get_replicas(request.keys)
        replicas = [pb.Replica(found=False) if m is None else pb.Replica(found=True,
                                                                         location=_loc(m))
                    for m in metas]
        return pb.GetReplicasResponse(replicas=replicas, nodes=self._nodes_of(metas),
                                      lease_ms=self.master.config.lease_ms)

    def MatchPrefix(self, request: pb.KeysRequest,
                    context: grpc.ServicerContext) -> pb.MatchPrefixResponse:
        metas = self.master.match_prefix(request.keys)
        return pb.MatchPrefixResponse(matched=len(metas), locations=[_loc(m) for m in metas],
                                      nodes=self._nodes_of(metas),
                                      lease_ms=self.master.config.lease_ms)

    def Exists(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.ExistsResponse:
        return pb.ExistsResponse(exists=self.master.exists(request.keys))

    def Remove(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.RemoveResponse:
        return pb.RemoveResponse(removed=self.master.remove(request.keys))

    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return status_to_pb(self.master.status())

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        objs, truncated = self.master.list_objects(request.prefix, request.limit or 100)
        return pb.ListResponse(
            objects=[pb.ObjectInfo(location=_loc(m), sealed=m.state.value == "sealed",
                                   leased=leased) for m, leased in objs],
            truncated=truncated,
        )


class MasterServer:
    """A running master: the gRPC server plus the reaper thread that drives timeouts."""

    def __init__(self, server: grpc.Server, port: int, master: Master) -> None:
        self.server = server
        self.port = port
        self.master = master
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kv-master-reaper",
                                        daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.master.config.reap_interval_s):
            try:
                self.master.reap()
            except Exception:  # the reaper must survive a bad round; log it loudly
                log.exception("reaper round failed")

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
        self._reaper.join(timeout=5)


def create_server(config: MasterConfig, master: Master | None = None) -> tuple[grpc.Server, int]:
    """A started master gRPC server (with health service) and its bound port."""
    srv = start_master(config, master)
    return srv.server, srv.port


def start_master(config: MasterConfig, master: Master | None = None) -> MasterServer:
    master = master or Master(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                    thread_name_prefix="kv-master"))
    pb_grpc.add_KVMasterServicer_to_server(MasterServicer(master), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind master to {config.host}:{config.port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("pantry.v1.KVMaster", health_pb2.HealthCheckResponse.SERVING)
    log.info("kvstore master serving on %s:%d", config.host, port)
    return MasterServer(server, port, master)
