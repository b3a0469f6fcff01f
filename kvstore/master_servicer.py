"""The KVMaster RPCs: protobuf <-> domain types around `Master`, the request limits, and the
event streams. `kvstore.master_service` runs it as a server."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from operator import attrgetter
from typing import TypeVar

import grpc

from kvstore.config import MAX_REPLICAS, MasterConfig
from kvstore.errors import (
    InvalidKeyError,
    NotLeaderError,
    RequestTooLargeError,
    UnknownNodeError,
)
from kvstore.events import EventGap
from kvstore.limits import MAX_KEY_CHARS, check_keys
from kvstore.master import Master, PutOutcome, Ticket
from kvstore.master_role import MasterRole
from kvstore.metadata import ObjectMeta
from kvstore.metrics import MasterMetrics
from kvstore.prefix_match import run_to_locations, run_to_proto, unpack_keys
from kvstore.wire import (
    drain_to_proto,
    event_to_proto,
    grant_to_proto,
    held_from_proto,
    location_to_proto,
    node_from_proto,
    node_to_proto,
    object_to_proto,
    status_to_proto,
    tier_order_to_proto,
    tier_report_from_proto,
)
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

_NODE_ID = attrgetter("node_id")

# A reader excludes the nodes it failed to read from: a few per read at most.
_MAX_EXCLUDED = 64

_OUTCOME = {
    PutOutcome.ALLOCATED: pb.PUT_STATE_ALLOCATED,
    PutOutcome.EXISTS: pb.PUT_STATE_EXISTS,
    PutOutcome.IN_PROGRESS: pb.PUT_STATE_IN_PROGRESS,
    PutOutcome.NO_SPACE: pb.PUT_STATE_NO_SPACE,
    PutOutcome.TOO_LARGE: pb.PUT_STATE_TOO_LARGE,
    PutOutcome.GONE: pb.PUT_STATE_GONE,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["MasterServicer", Req, grpc.ServicerContext], Resp]


def _timed(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Observes the RPC's latency, labelled with its name, whether it answers or aborts; a
    standby refuses the call UNAVAILABLE, naming the leader; a request over the limits is
    refused with the status that names it. (The token is checked before this, by the server's
    `TokenInterceptor`.)"""

    @functools.wraps(method)
    def timed(self: MasterServicer, request: Req, context: grpc.ServicerContext) -> Resp:
        start = time.perf_counter()
        try:
            self.check_leading(context)
            return method(self, request, context)
        except InvalidKeyError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raised already; this line only tells type checkers
        except RequestTooLargeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            raise
        except NotLeaderError as e:
            self.refuse(e, context)
            raise
        finally:
            self.rpc_seconds.labels(method.__name__).observe(time.perf_counter() - start)

    return timed


class MasterServicer(MasterRole, pb_grpc.KVMasterServicer):
    def __init__(self, config: MasterConfig, master: Master | None) -> None:
        """`master`: the one to serve; None for a master that must win the leader lease first
        (`leadership` set before serving), which builds its own when elected."""
        super().__init__(config, master)
        # A standby's (or deposed leader's) master is stale: its figures are not exported.
        self.metrics = MasterMetrics(lambda: self._master if self.leading() else None,
                                     self.leading)
        self.rpc_seconds = self.metrics.rpc_seconds
        # Each event stream holds a server thread: leave most of them to the other calls.
        self._watch_lock = threading.Lock()
        self._watchers = 0
        self._max_watchers = max(1, config.max_workers // 4)

    @property
    def watchers(self) -> int:
        """Event streams open now."""
        return self._watchers

    def WatchEvents(self, request: pb.WatchEventsRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.PoolEvent]:
        self.check_leading(context)
        _check_prefix(request.prefix, context)
        master = self.master
        log_ = master.events
        if request.run_id and request.run_id != log_.run_id:
            from_seq = 1  # another run's numbers mean nothing here: this run from its start
        else:
            from_seq = request.from_seq or log_.last_seq + 1
        return self._follow(master, from_seq, request.prefix, context)

    def _follow(self, master: Master, from_seq: int, prefix: str,
                context: grpc.ServicerContext) -> Iterator[pb.PoolEvent]:
        events = master.events
        with self._watch_lock:
            full = self._watchers >= self._max_watchers
            self._watchers += not full
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self._max_watchers} event watchers already (each holds a server "
                          f"thread); raise --max-workers, now {self.config.max_workers}")
        try:
            while True:
                gap, batch = events.read(from_seq)
                if gap:
                    yield event_to_proto(EventGap(events.run_id, gap))
                for e in batch:
                    if not prefix or not e.key or e.key.startswith(prefix):
                        yield event_to_proto(e)
                from_seq = batch[-1].seq + 1 if batch else from_seq + gap
                while not events.wait(from_seq, 0.5):
                    if not context.is_active():
                        return
                    if self._master is not master or not self.leading():
                        # Deposed: the watcher follows the new leader (another run).
                        self.check_leading(context)
                        context.abort(grpc.StatusCode.UNAVAILABLE, "master changed; watch "
                                      "the new leader")
        finally:
            with self._watch_lock:
                self._watchers -= 1

    def _keys(self, keys: Iterable[str], field: str = "keys") -> list[str]:
        keys = list(keys)
        check_keys(keys, self.master.config.max_keys_per_request, field)
        return keys

    def _tickets(self, request: pb.PutFinishRequest) -> list[Ticket]:
        self._keys((p.key for p in request.puts), "puts")
        return [(p.key, p.token, p.node_id) for p in request.puts]

    def _nodes_of(self, metas: Iterable[ObjectMeta | None]) -> list[pb.NodeInfo]:
        out = []
        # A set of ids at C speed: a prefix match hands thousands of locations.
        for node_id in sorted(set(map(_NODE_ID, filter(None, metas)))):
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
        known = self.master.heartbeat(request.node_id, request.epoch)
        if not known:
            return pb.HeartbeatResponse(known=False)
        done, dropped = tier_report_from_proto(request.tiers)
        orders = self.master.tier_heartbeat(request.node_id, request.epoch, done, dropped)
        return pb.HeartbeatResponse(known=True,
                                    orders=[tier_order_to_proto(o) for o in orders])

    @_timed
    def PutStart(self, request: pb.PutStartRequest,
                 context: grpc.ServicerContext) -> pb.PutStartResponse:
        if len(request.keys) != len(request.sizes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "keys and sizes differ in length")
        if request.replicas > MAX_REPLICAS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"replicas: at most {MAX_REPLICAS}, got {request.replicas}")
        keys = self._keys(request.keys)
        grants = self.master.put_start(keys, request.sizes, request.client_host_id,
                                       request.replicas, request.replace_node)
        slots = []
        for g in grants:
            slot = pb.PutSlot(state=_OUTCOME[g.outcome], wanted=g.wanted)
            if g.location is not None:
                slot.location.CopyFrom(location_to_proto(g.location))
            if g.grant is not None:
                slot.grant.CopyFrom(grant_to_proto(g.grant))
            slot.replicas.extend(pb.ReplicaGrant(location=location_to_proto(m),
                                                 grant=grant_to_proto(w)) for m, w in g.replicas)
            slots.append(slot)
        nodes = self._nodes_of(m for g in grants for m, _ in g.replicas)
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
        if len(request.exclude_nodes) > _MAX_EXCLUDED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"exclude_nodes: at most {_MAX_EXCLUDED} node ids, got "
                          f"{len(request.exclude_nodes)}")
        metas = self.master.get_replicas(self._keys(request.keys), request.client_host_id,
                                         frozenset(request.exclude_nodes))
        replicas = [pb.Replica(found=False) if m is None
                    else pb.Replica(found=True, location=location_to_proto(m)) for m in metas]
        return pb.GetReplicasResponse(replicas=replicas, nodes=self._nodes_of(metas),
                                      lease_ms=self.master.config.lease_ms,
                                      membership=self.master.membership)

    @_timed
    def MatchPrefix(self, request: pb.KeysRequest,
                    context: grpc.ServicerContext) -> pb.MatchPrefixResponse:
        if request.packed_keys and request.keys:
            raise InvalidKeyError("packed_keys", "set keys or packed_keys, not both")
        keys = (unpack_keys(request.packed_keys, self.master.config.max_keys_per_request)
                if request.packed_keys else self._keys(request.keys))
        run = self.master.match_run(keys, request.client_host_id)
        resp = pb.MatchPrefixResponse(nodes=[node_to_proto(n) for n in run.nodes],
                                      lease_ms=self.master.config.lease_ms,
                                      membership=self.master.membership)
        if request.compact:
            run_to_proto(run, resp, request.packed_columns)
        else:
            run_to_locations(run, resp)
        return resp

    @_timed
    def Exists(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.ExistsResponse:
        return pb.ExistsResponse(exists=self.master.exists(self._keys(request.keys)))

    @_timed
    def Remove(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.RemoveResponse:
        return pb.RemoveResponse(removed=self.master.remove(self._keys(request.keys)))

    @_timed
    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return status_to_proto(replace(self.master.status(), leader=self.address,
                                       role=self.role()))

    @_timed
    def Evict(self, request: pb.EvictRequest,
              context: grpc.ServicerContext) -> pb.EvictResponse:
        if [request.bytes > 0, bool(request.prefix), request.all].count(True) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "name exactly one of bytes, prefix and all")
        _check_prefix(request.prefix, context)
        prefix = "" if request.all else (request.prefix or None)
        n, nbytes = self.master.evict(request.bytes, prefix)
        return pb.EvictResponse(evicted=n, bytes=nbytes)

    @_timed
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        limit = min(request.limit or 100, self.master.config.max_keys_per_request)
        objs, truncated = self.master.list_objects(request.prefix, limit)
        return pb.ListResponse(objects=[object_to_proto(m, leased) for m, leased in objs],
                               truncated=truncated)

    @_timed
    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainResponse:
        drop = self._keys(request.drop, "drop")
        limit = min(request.limit or 1024, self.master.config.max_keys_per_request)
        try:
            state = self.master.drain(request.node_id, limit, drop, request.cancel)
        except UnknownNodeError as e:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"node_id: {e}; `kvstore status` lists the nodes")
            raise
        return drain_to_proto(state)


def _check_prefix(prefix: str, context: grpc.ServicerContext) -> None:
    """A key prefix (of a watch, of an eviction) no longer than a key, or INVALID_ARGUMENT."""
    if len(prefix) > MAX_KEY_CHARS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"prefix: longer than a key ({MAX_KEY_CHARS} characters)")
