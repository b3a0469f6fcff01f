"""Reads of objects held on a node's SSD tier, for the client's read path.

A client on the node's host reads the node's file itself (the node's NodeInfo names its
directory), straight into the caller's memory: one `preadv` puts the header in a scratch and the
payload in the caller's buffer. Elsewhere, or where the directory cannot be read, the node's
gRPC Read serves the object by key (tier "ssd"), checked on the node first. Either way the
reader checks what arrives, like every read; nothing here trusts a file.
"""

from __future__ import annotations

import os
import threading

import grpc

from kvstore.auth import open_channel
from kvstore.metadata import SSD, NodeInfo
from kvstore.ssd_tier import file_name
from kvstore.transports import TransportError
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc


class SsdReader:
    name = "ssd"

    def __init__(self, host_id: str, token: str, timeout_s: float,
                 max_message_bytes: int) -> None:
        self._host_id = host_id
        self._token = token
        self._timeout = timeout_s
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        # Per node id: the registration a channel was opened for, and the channel.
        self._channels: dict[str, tuple[NodeInfo, grpc.Channel]] = {}

    def local_path(self, node: NodeInfo, key: str) -> str | None:
        """The file of `key` when this client shares the node's host and can see its directory."""
        if node.host_id != self._host_id or not node.ssd_dir or not os.path.isdir(node.ssd_dir):
            return None
        return os.path.join(node.ssd_dir, file_name(key))

    def read(self, node: NodeInfo, keys: list[str], lengths: list[int]) -> list[bytes]:
        """Each object's bytes (b"" for a file gone or of another size: a miss for the
        checks); TransportError when the node cannot be asked."""
        out: list[bytes] = []
        remote: list[int] = []
        for i, (key, n) in enumerate(zip(keys, lengths, strict=True)):
            path = self.local_path(node, key)
            if path is None:
                remote.append(i)
                out.append(b"")
                continue
            buf = bytearray(n)
            out.append(bytes(buf) if self._pread(path, [memoryview(buf)]) else b"")
        if remote:
            got = self._remote(node, [keys[i] for i in remote])
            for i, data in zip(remote, got, strict=True):
                out[i] = data
        return out

    def read_into(self, node: NodeInfo, key: str, header: memoryview,
                  payload: memoryview) -> bool:
        """The object of `key` as two parts: header into `header`, payload into `payload`
        (exact sizes). False when the bytes could not be had (a miss)."""
        path = self.local_path(node, key)
        if path is not None:
            return self._pread(path, [header, payload])
        data = self._remote(node, [key])[0]
        if len(data) != header.nbytes + payload.nbytes:
            return False
        header[:] = data[: header.nbytes]
        payload[:] = data[header.nbytes :]
        return True

    @staticmethod
    def _pread(path: str, views: list[memoryview]) -> bool:
        """Fill `views` from the file's start; False when the file is gone or of another size
        (evicted and replaced since the master answered)."""
        want = sum(v.nbytes for v in views)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size != want:
                return False
            done = 0
            while done < want:  # a short read resumes where it stopped
                rest, skip = [], done
                for v in views:
                    if skip >= v.nbytes:
                        skip -= v.nbytes
                        continue
                    rest.append(v[skip:])
                    skip = 0
                n = os.preadv(fd, rest, done)
                if n <= 0:
                    return False
                done += n
            return True
        finally:
            os.close(fd)

    def _remote(self, node: NodeInfo, keys: list[str]) -> list[bytes]:
        req = pb.ReadRequest(ops=[pb.ReadOp(key=k, tier=SSD) for k in keys], epoch=node.epoch)
        try:
            resp = pb_grpc.KVNodeStub(self._channel(node)).Read(req, timeout=self._timeout)
        except grpc.RpcError as e:
            raise TransportError(f"grpc ssd read failed: {e.code()}: {e.details()}") from e
        if len(resp.data) != len(keys):
            raise TransportError("node answered a different number of reads")
        return list(resp.data)

    def _channel(self, node: NodeInfo) -> grpc.Channel:
        with self._lock:
            held = self._channels.get(node.node_id)
            if held is not None and held[0] == node:
                return held[1]
            channel = open_channel(node.address, self._token, self._max_message_bytes)
            self._channels[node.node_id] = (node, channel)
        if held is not None:
            held[1].close()
        return channel

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for _, channel in channels:
            channel.close()
