"""gRPC edge of the master: converts protobuf <-> domain types around `Master`."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc

from kvstore.auth import check_call, load_token
from kvstore.config import REGISTER_MESSAGE_BYTES, MasterConfig
from kvstore.errors import InvalidKeyError, RequestTooLargeError, UnknownNodeError
from kvstore.limits import MAX_KEY_CHARS, check_keys
from kvstore.master import Master, PutOutcome
from kvstore.metadata import ObjectMeta
from kvstore.metrics import MasterMetrics
from kvstore.wire import (
    grant_to_proto,
    held_from_proto,
    location_to_proto,
    node_from_proto,
    node_to_proto,
    object_to_proto,
    status_to_proto,
)
from pantry.common.metrics import MetricsServer
from pantry.common.serving import create_grpc_server
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVMaster"].full_name

_OUTCOME = {
    PutOutcome.ALLOCATED: pb.PUT_STATE_ALLOCATED,
    PutOutcome.EXISTS: pb.PUT_STATE_EXISTS,
    PutOutcome.IN_PROGRESS: pb.PUT_STATE_IN_PROGRESS,
    PutOutcome.NO_SPACE: pb.PUT_STATE_NO_SPACE,
    PutOutcome.TOO_LARGE: pb.PUT_STATE_TOO_LARGE,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["MasterServicer", Req, grpc.ServicerContext], Resp]


def _timed(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Observes the RPC's latency, labelled with its name, whether it answers or aborts; a
    request over the limits is refused with the status that names it."""

    @functools.wraps(method)
    def timed(self: MasterServicer, request: Req, context: grpc.ServicerContext) -> Resp:
        start = time.perf_counter()
        try:
            check_call(self.token, context)
            return method(self, request, context)
        except InvalidKeyError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raised already; this line only tells type checkers
        except RequestTooLargeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            raise
        finally:
            self.rpc_seconds.labels(method.__name__).observe(time.perf_counter() - start)

    return timed


class MasterServicer(pb_grpc.KVMasterServicer):
    def __init__(self, master: Master, metrics: MasterMetrics, token: str = "") -> None:
        self.master = master
        self.rpc_seconds = metrics.rpc_seconds
        self.token = token

    def _keys(self, keys: Iterable[str], field: str = "keys") -> list[str]:
        keys = list(keys)
        check_keys(keys, self.master.config.max_keys_per_request, field)
        return keys

    def _tickets(self, request: pb.PutFinishRequest) -> list[tuple[str, int]]:
        self._keys((p.key for p in request.puts), "puts")
        return [(p.key, p.token) for p in request.puts]

    def _nodes_of(self, metas: Iterable[ObjectMeta | None]) -> list[pb.NodeInfo]:
        out = []
        for node_id in sorted({m.node_id for m in metas if m is not None}):
            try:
                out.append(node_to_proto(self.master.node(node_id)))
            except UnknownNodeError:
                # Dropped since the lookup: its locations are misses for the client.
                continue
        return out

    @_timed
    def RegisterNode(self, request: pb.RegisterNodeRequest,
                     context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        if not request.node.node_id or not request.node.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id and address are required")
        held = [held_from_proto(h) for h in request.held]
        reg = self.master.register_node(node_from_proto(request.node), held)
        return pb.RegisterNodeResponse(node_timeout_s=self.master.config.node_timeout_s,
                                       epoch=reg.epoch, grant_key=reg.grant_key,
                                       adopted=reg.adopted)

    @_timed
    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(known=self.master.heartbeat(request.node_id, request.epoch))

    @_timed
    def PutStart(self, request: pb.PutStartRequest,
                 context: grpc.ServicerContext) -> pb.PutStartResponse:
        if len(request.keys) != len(request.sizes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "keys and sizes differ in length")
        keys = self._keys(request.keys)
        grants = self.master.put_start(keys, request.sizes, request.client_host_id)
        slots = []
        for g in grants:
            slot = pb.PutSlot(state=_OUTCOME[g.outcome])
            if g.location is not None:
                slot.location.CopyFrom(location_to_proto(g.location))
            if g.grant is not None:
                slot.grant.CopyFrom(grant_to_proto(g.grant))
            slots.append(slot)
        nodes = self._nodes_of(g.location for g in grants)
        return pb.PutStartResponse(slots=slots, nodes=nodes,
                                   max_object_bytes=self.master.config.max_object_bytes,
                                   membership=self.master.membership)

    @_timed
    def PutEnd(self, request: pb.PutFinishRequest,
               context: grpc.ServicerContext) -> pb.PutEndResponse:
        return pb.PutEndResponse(sealed=self.master.put_end(self._tickets(request)))

    @_timed
    def PutAbort(self, request: pb.PutFinishRequest,
                 context: grpc.ServicerContext) -> pb.PutAbortResponse:
        return pb.PutAbortResponse(aborted=self.master.put_abort(self._tickets(request)))

    @_timed
    def GetReplicas(self, request: pb.KeysRequest,
                    context: grpc.ServicerContext) -> pb.GetReplicasResponse:
        metas = self.master.get_replicas(self._keys(request.keys))
        replicas = [pb.Replica(found=False) if m is None
                    else pb.Replica(found=True, location=location_to_proto(m)) for m in metas]
        return pb.GetReplicasResponse(replicas=replicas, nodes=self._nodes_of(metas),
                                      lease_ms=self.master.config.lease_ms,
                                      membership=self.master.membership)

    @_timed
    def MatchPrefix(self, request: pb.KeysRequest,
                    context: grpc.ServicerContext) -> pb.MatchPrefixResponse:
        metas = self.master.match_prefix(self._keys(request.keys))
        return pb.MatchPrefixResponse(matched=len(metas),
                                      locations=[location_to_proto(m) for m in metas],
                                      nodes=self._nodes_of(metas),
                                      lease_ms=self.master.config.lease_ms,
                                      membership=self.master.membership)

    @_timed
    def Exists(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.ExistsResponse:
        return pb.ExistsResponse(exists=self.master.exists(self._keys(request.keys)))

    @_timed
    def Remove(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.RemoveResponse:
        return pb.RemoveResponse(removed=self.master.remove(self._keys(request.keys)))

    @_timed
    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return status_to_proto(self.master.status())

    @_timed
    def Evict(self, request: pb.EvictRequest,
              context: grpc.ServicerContext) -> pb.EvictResponse:
        if [request.bytes > 0, bool(request.prefix), request.all].count(True) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "name exactly one of bytes, prefix and all")
        if len(request.prefix) > MAX_KEY_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prefix: longer than a key ({MAX_KEY_CHARS} characters)")
        prefix = "" if request.all else (request.prefix or None)
        n, nbytes = self.master.evict(request.bytes, prefix)
        return pb.EvictResponse(evicted=n, bytes=nbytes)

    @_timed
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        limit = min(request.limit or 100, self.master.config.max_keys_per_request)
        objs, truncated = self.master.list_objects(request.prefix, limit)
        return pb.ListResponse(objects=[object_to_proto(m, leased) for m, leased in objs],
                               truncated=truncated)


class MasterServer:
    """A running master: the gRPC server, the reaper thread that drives timeouts, /metrics."""

    def __init__(self, server: grpc.Server, port: int, master: Master,
                 metrics: MetricsServer) -> None:
        self.server = server
        self.port = port
        self.master = master
        self.metrics = metrics
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
        self.metrics.close()
        self.master.close()


def start_master(config: MasterConfig, master: Master | None = None) -> MasterServer:
    """A serving master (gRPC with health and reflection, reaper, /metrics)."""
    token = load_token(config.token_file)
    master = master or Master(config)
    metrics = MasterMetrics(master)
    servicer = MasterServicer(master, metrics, token)
    server, port, _ = create_grpc_server(
        config.host, config.port, lambda s: pb_grpc.add_KVMasterServicer_to_server(servicer, s),
        [SERVICE_NAME], max_workers=config.max_workers, thread_name_prefix="kv-master",
        max_message_bytes=REGISTER_MESSAGE_BYTES)
    server.start()
    try:
        metrics_server = MetricsServer(metrics.registry, config.host, config.metrics_port)
    except BaseException:
        server.stop(0)
        raise
    log.info("kvstore master serving on %s:%d, metrics at %s", config.host, port,
             metrics_server.url)
    return MasterServer(server, port, master, metrics_server)
