"""The always-available transport: the node's KVNode Write/Read RPCs, batched by size."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from kvstore.auth import open_channel
from kvstore.grants import WriteGrant
from kvstore.transports import TransportError, batches
from kvstore.wire import grant_to_proto
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc


class GrpcTransport:
    name = "grpc"

    def __init__(self, address: str, max_message_bytes: int, batch_bytes: int,
                 timeout_s: float, epoch: int = 0, token: str = "") -> None:
        self._channel = open_channel(address, token, max_message_bytes)
        self._stub = pb_grpc.KVNodeStub(self._channel)
        self._batch_bytes = batch_bytes
        self._timeout = timeout_s
        self._epoch = epoch

    def write(self, ops: Sequence[tuple[WriteGrant, bytes | memoryview]]) -> None:
        sizes = [memoryview(d).nbytes for _, d in ops]
        for batch in batches(ops, sizes, self._batch_bytes):
            req = pb.WriteRequest(ops=[pb.WriteOp(grant=grant_to_proto(g), data=bytes(d))
                                       for g, d in batch])
            try:
                self._stub.Write(req, timeout=self._timeout)
            except grpc.RpcError as e:
                raise TransportError(f"grpc write failed: {e.code()}: {e.details()}") from e

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes] = []
        for batch in batches(ops, [n for _, n in ops], self._batch_bytes):
            req = pb.ReadRequest(ops=[pb.ReadOp(offset=o, length=n) for o, n in batch],
                                 epoch=self._epoch)
            try:
                resp = self._stub.Read(req, timeout=self._timeout)
            except grpc.RpcError as e:
                raise TransportError(f"grpc read failed: {e.code()}: {e.details()}") from e
            if len(resp.data) != len(batch):
                raise TransportError("node answered a different number of reads")
            out.extend(resp.data)
        return out

    def close(self) -> None:
        self._channel.close()
