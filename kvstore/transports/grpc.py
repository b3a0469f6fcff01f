"""The always-available transport: the node's KVNode Write/Read RPCs, batched by size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc

from kvstore.transports import TransportError
from pantry.common.serving import grpc_options
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

T = TypeVar("T")


def _batches(ops: Sequence[T], sizes: Sequence[int], limit: int) -> Iterator[list[T]]:
    """Consecutive groups whose total size stays <= limit (a lone oversize op goes alone)."""
    batch: list[T] = []
    total = 0
    for op, size in zip(ops, sizes, strict=True):
        if batch and total + size > limit:
            yield batch
            batch, total = [], 0
        batch.append(op)
        total += size
    if batch:
        yield batch


class GrpcTransport:
    name = "grpc"

    def __init__(self, address: str, max_message_bytes: int, batch_bytes: int,
                 timeout_s: float) -> None:
        self._channel = grpc.insecure_channel(address, options=grpc_options(max_message_bytes))
        self._stub = pb_grpc.KVNodeStub(self._channel)
        self._batch_bytes = batch_bytes
        self._timeout = timeout_s

    def write(self, ops: Sequence[tuple[int, bytes | memoryview]]) -> None:
        sizes = [memoryview(d).nbytes for _, d in ops]
        for batch in _batches(ops, sizes, self._batch_bytes):
            req = pb.WriteRequest(ops=[pb.WriteOp(offset=o, data=bytes(d)) for o, d in batch])
            try:
                self._stub.Write(req, timeout=self._timeout)
            except grpc.RpcError as e:
                raise TransportError(f"grpc write failed: {e.code()}: {e.details()}") from e

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes] = []
        for batch in _batches(ops, [n for _, n in ops], self._batch_bytes):
            req = pb.ReadRequest(ops=[pb.ReadOp(offset=o, length=n) for o, n in batch])
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
