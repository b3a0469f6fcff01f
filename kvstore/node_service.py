"""gRPC edge of the storage node: the batched Write/Read data path over its segment."""

from __future__ import annotations

import functools
import logging

import grpc

from kvstore.auth import token_interceptors
from kvstore.config import NodeConfig
from kvstore.errors import RequestTooLargeError, SegmentError
from kvstore.limits import check_read_size
from kvstore.metrics import NodeMetrics
from kvstore.node import StorageNode
from kvstore.transports import READ, WRITE
from kvstore.transports.rdma import RdmaServer, open_rdma_server
from kvstore.transports.rdma_exchange import RdmaError, connect_response, endpoint_from_proto
from kvstore.transports.tcp_server import TcpServer
from kvstore.wire import grant_from_proto
from pantry.common.errors import InvalidRequest
from pantry.common.metrics import MetricsServer
from pantry.common.serving import create_grpc_server
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVNode"].full_name


class NodeServicer(pb_grpc.KVNodeServicer):
    def __init__(self, node: StorageNode, metrics: NodeMetrics) -> None:
        self.node = node
        self.metrics = metrics
        # The segment registered for one-sided RDMA, when this host has a device.
        self.rdma: RdmaServer | None = None

    def Write(self, request: pb.WriteRequest, context: grpc.ServicerContext) -> pb.WriteResponse:
        """Every op is checked before any is written: a refused request changes nothing."""
        cfg = self.node.config
        written = 0
        try:
            if len(request.ops) > cfg.max_ops_per_request:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(request.ops)} writes in one request; max_ops_per_request "
                              f"is {cfg.max_ops_per_request}")
            for op in request.ops:
                if len(op.data) > cfg.max_object_bytes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"object of {len(op.data)} bytes exceeds max_object_bytes "
                                  f"{cfg.max_object_bytes}")
                why = self.node.write_refusal(grant_from_proto(op.grant), len(op.data))
                if why is not None:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            for op in request.ops:
                self.node.segment.write(op.grant.offset, op.data)
                written += len(op.data)
        except SegmentError as e:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        finally:
            self.metrics.record("grpc", WRITE, written)
        return pb.WriteResponse()

    def Read(self, request: pb.ReadRequest, context: grpc.ServicerContext) -> pb.ReadResponse:
        cfg = self.node.config
        data: list[bytes] = []
        try:
            check_read_size(len(request.ops), sum(op.length for op in request.ops),
                            cfg.max_ops_per_request, cfg.max_message_bytes)
            why = self.node.read_refusal(request.epoch)
            if why is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
            data = [self.node.read_tier(op.offset, op.length, op.key, op.tier)
                    for op in request.ops]
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestTooLargeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except SegmentError as e:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        finally:
            self.metrics.record("grpc", READ, sum(len(d) for d in data))
        return pb.ReadResponse(data=data)

    def RdmaConnect(self, request: pb.RdmaConnectRequest,
                    context: grpc.ServicerContext) -> pb.RdmaConnectResponse:
        """A queue pair of the node's for the client's; reads and writes are one-sided after."""
        try:
            client = endpoint_from_proto(request.client)
        except RdmaError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.rdma is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.node.config.node_id} has no RDMA device (ibv_devices "
                          "lists none here); use the tcp or grpc transport")
        rdma = self.rdma
        assert rdma is not None, "context.abort raises"
        why = self.node.read_refusal(request.epoch)
        if why is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        try:
            mine = rdma.accept(client)
        except RdmaError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return connect_response(mine, rdma.segment)


class NodeServer:
    """A running storage node: gRPC server (+ optional TCP server) + segment + membership,
    and its /metrics."""

    def __init__(self, server: grpc.Server, port: int, node: StorageNode,
                 tcp: TcpServer | None, metrics: MetricsServer,
                 rdma: RdmaServer | None = None) -> None:
        self.server = server
        self.port = port
        self.node = node
        self.tcp = tcp
        self.metrics = metrics
        self.rdma = rdma

    @property
    def address(self) -> str:
        return self.node.address

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        if self.tcp is not None:
            self.tcp.close()
        if self.rdma is not None:
            self.rdma.close()  # before the segment it registered is unmapped
        self.metrics.close()
        self.node.close()


def start_node(config: NodeConfig) -> NodeServer:
    """A serving node: segment created, gRPC (with health and reflection), bulk TCP unless
    `tcp_port` is None, /metrics, and registering with the master in the background."""
    node = StorageNode(config)
    server: grpc.Server | None = None
    tcp: TcpServer | None = None
    try:
        metrics = NodeMetrics(node.segment.size,
                              ["grpc"] if config.tcp_port is None else ["grpc", "tcp"], node.ssd)
        servicer = NodeServicer(node, metrics)
        server, port, _ = create_grpc_server(
            config.host, config.port, lambda s: pb_grpc.add_KVNodeServicer_to_server(servicer, s),
            [SERVICE_NAME], max_workers=config.max_workers, thread_name_prefix="kv-node",
            max_message_bytes=config.max_message_bytes,
            interceptors=token_interceptors(node.token, [SERVICE_NAME]))
        server.start()
        if config.tcp_port is not None:
            tcp = TcpServer(config.host, config.tcp_port, node,
                            functools.partial(metrics.record, "tcp"), node.token)
            node.tcp_address = tcp.address
        metrics_server = MetricsServer(metrics.registry, config.host, config.metrics_port)
    except BaseException:
        if tcp is not None:
            tcp.close()
        if server is not None:
            server.stop(0)
        node.close()
        raise
    servicer.rdma = open_rdma_server(node.segment.view)
    node.start_membership(f"{config.host}:{port}")
    log.info("kvstore node %s serving on %s:%d (tcp %s), segment %s (%d bytes), metrics at %s",
             config.node_id, config.host, port, node.tcp_address or "off", node.segment.path,
             node.segment.size, metrics_server.url)
    return NodeServer(server, port, node, tcp, metrics_server, servicer.rdma)
