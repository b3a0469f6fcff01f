"""The always-available transport: the node's KVNode Write/Read RPCs, batched by size."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from kvstore.auth import open_channel
from kvstore.grants import WriteGrant
from kvstore.transports import (
    Landed,
    ReadInto,
    TransportError,
    WriteData,
    batches,
    parts_of,
)
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

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        # A protobuf bytes field needs one bytes object: the parts are joined here (the
        # fallback path; shm and tcp write them as they are).
        joined = [(g, b"".join(parts_of(d))) for g, d in ops]
        for batch in batches(joined, [len(d) for _, d in joined], self._batch_bytes):
            req = pb.WriteRequest(ops=[pb.WriteOp(grant=grant_to_proto(g), data=d)
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

    def read_into(self, ops: Sequence[ReadInto], landed: Landed | None = None) -> None:
        """The fallback: one copy out of each response into the caller's views."""
        sized = [(off, views, sum(v.nbytes for v in views)) for off, views in ops]
        got = self.read([(off, n) for off, _, n in sized])
        for i, ((_, views, n), data) in enumerate(zip(sized, got, strict=True)):
            if len(data) != n:
                raise TransportError(f"node answered {len(data)} bytes for a read of {n}")
            src = memoryview(data)
            pos = 0
            for v in views:
                v[:] = src[pos : pos + v.nbytes]
                pos += v.nbytes
            if landed is not None:
                landed(i)

    def close(self) -> None:
        self._channel.close()
