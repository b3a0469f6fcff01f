"""gRPC edge of the storage node: the batched Write/Read data path over its segment."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.config import NodeConfig
from kvstore.errors import SegmentError
from kvstore.node import StorageNode
from kvstore.transports.tcp import TcpServer
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NodeServicer(pb_grpc.KVNodeServicer):
    def __init__(self, node: StorageNode) -> None:
        self.node = node

    def Write(self, request: pb.WriteRequest, context: grpc.ServicerContext) -> pb.WriteResponse:
        limit = self.node.config.max_object_bytes
        try:
            for op in request.ops:
                if len(op.data) > limit:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"object of {len(op.data)} bytes exceeds max_object_bytes "
                                  f"{limit}")
                self.node.segment.write(op.offset, op.data)
        except SegmentError as e:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        return pb.WriteResponse()

    def Read(self, request: pb.ReadRequest, context: grpc.ServicerContext) -> pb.ReadResponse:
        try:
            return pb.ReadResponse(data=[self.node.segment.read(op.offset, op.length)
                                         for op in request.ops])
        except SegmentError as e:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
            raise AssertionError("unreachable") from e


class NodeServer:
    """A running storage node: gRPC server (+ optional TCP server) + segment + membership."""

    def __init__(self, server: grpc.Server, port: int, node: StorageNode,
                 tcp: TcpServer | None) -> None:
        self.server = server
        self.port = port
        self.node = node
        self.tcp = tcp

    @property
    def address(self) -> str:
        return self.node.address

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        if self.tcp is not None:
            self.tcp.close()
        self.node.close()


def create_server(config: NodeConfig) -> tuple[grpc.Server, int]:
    """A started node server (segment created, registering with the master) and its port."""
    srv = start_node(config)
    return srv.server, srv.port


def start_node(config: NodeConfig) -> NodeServer:
    node = StorageNode(config)
    try:
        opts = [("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                        thread_name_prefix="kv-node"),
                             options=opts)
        pb_grpc.add_KVNodeServicer_to_server(NodeServicer(node), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot bind node to {config.host}:{config.port}")
        server.start()
        tcp = None
        if config.tcp_port is not None:
            tcp = TcpServer(config.host, config.tcp_port, node.segment.view,
                            config.max_object_bytes)
            node.tcp_address = tcp.address
    except BaseException:
        node.close()
        raise
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("pantry.v1.KVNode", health_pb2.HealthCheckResponse.SERVING)
    node.start_membership(f"{config.host}:{port}")
    log.info("kvstore node %s serving on %s:%d (tcp %s), segment %s (%d bytes)", config.node_id,
             config.host, port, node.tcp_address or "off", node.segment.path, node.segment.size)
    return NodeServer(server, port, node, tcp)
