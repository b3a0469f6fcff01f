"""Reads of objects held on a node's SSD tier, for the client's read path.

A client on the node's host reads the node's file itself (the node's NodeInfo names its
directory), straight into the caller's memory: one `preadv` puts the header in a scratch and the
payload in the caller's buffer. Elsewhere, or where the directory cannot be read, the node
serves the object by key, checked on the node first: over its bulk TCP server when it has one
(received straight into the caller's memory, the objects of one call in one request), else, or
when that fails, through its gRPC Read (tier "ssd"). Either way the reader checks what arrives,
like every read; nothing here trusts a file.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

from kvstore.auth import open_channel
from kvstore.metadata import SSD, NodeInfo
from kvstore.ssd_tier import file_name
from kvstore.transports import Landed, TransportError, batches
from kvstore.transports.tcp import TcpTransport
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class SsdReader:
    name = "ssd"

    def __init__(self, host_id: str, token: str, timeout_s: float,
                 max_message_bytes: int, enable_tcp: bool = True,
                 batch_bytes: int = 16 * 1024 * 1024) -> None:
        self._host_id = host_id
        self._enable_tcp = enable_tcp
        self._batch_bytes = batch_bytes
        self._token = token
        self._timeout = timeout_s
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        # Per node id: the registration a channel was opened for, and the channel.
        self._channels: dict[str, tuple[NodeInfo, grpc.Channel]] = {}
        # Per node id: the registration a TCP transport was opened for, and the transport.
        self._tcp: dict[str, tuple[NodeInfo, TcpTransport]] = {}

    def local_path(self, node: NodeInfo, key: str) -> str | None:
        """The file of `key` when this client shares the node's host and can see its directory."""
        if node.host_id != self._host_id or not node.ssd_dir or not os.path.isdir(node.ssd_dir):
            return None
        return os.path.join(node.ssd_dir, file_name(key))

    def read(self, node: NodeInfo, keys: list[str], lengths: list[int]) -> list[bytes]:
        """Each object's bytes (b"" for a file gone or of another size: a miss for the
        checks); TransportError when the node cannot be asked."""
        bufs = [memoryview(bytearray(n)) for n in lengths]
        got = self.read_many_into(node, [(k, [b]) for k, b in zip(keys, bufs, strict=True)])
        return [bytes(b) if ok else b"" for b, ok in zip(bufs, got, strict=True)]

    def read_many_into(self, node: NodeInfo, ops: list[tuple[str, list[memoryview]]],
                       landed: Landed | None = None) -> list[bool]:
        """Each object of `ops` (key, the views its bytes fill in turn: exact sizes), True per
        object received, False for a miss; TransportError when the node cannot be asked.
        `landed(i)` as each file of this host's is read (the node's come after)."""
        out = [False] * len(ops)
        remote: list[int] = []
        for i, (key, views) in enumerate(ops):
            path = self.local_path(node, key)
            if path is None:
                remote.append(i)
            else:
                out[i] = self._pread(path, views)
                if out[i] and landed is not None:
                    landed(i)
        if not remote:
            return out
        tcp = self._tcp_for(node)
        if tcp is not None:
            try:
                got = tcp.read_ssd_into([ops[i] for i in remote])
            except TransportError as e:
                log.warning("ssd read over tcp from node %s failed (%s); using grpc",
                            node.node_id, e)
                self._drop_tcp(node)
            else:
                for i, ok in zip(remote, got, strict=True):
                    out[i] = ok
                return out
        # In messages of at most batch_bytes, as the node's gRPC answers are bounded.
        sizes = [sum(v.nbytes for v in ops[i][1]) for i in remote]
        data = [d for group in batches(remote, sizes, self._batch_bytes)
                for d in self._remote(node, [ops[i][0] for i in group])]
        for i, d in zip(remote, data, strict=True):
            views = ops[i][1]
            if len(d) != sum(v.nbytes for v in views):
                continue
            pos = 0
            for v in views:
                v[:] = d[pos : pos + v.nbytes]
                pos += v.nbytes
            out[i] = True
        return out

    def _tcp_for(self, node: NodeInfo) -> TcpTransport | None:
        """The TCP transport to `node`'s registration; None when tcp is off or it has none."""
        if not self._enable_tcp or not node.tcp_address:
            return None
        with self._lock:
            held = self._tcp.get(node.node_id)
            if held is not None and held[0] == node:
                return held[1]
            t = TcpTransport(node.tcp_address, self._timeout, node.epoch, self._batch_bytes,
                             self._token)
            self._tcp[node.node_id] = (node, t)
        if held is not None:
            held[1].close()
        return t

    def _drop_tcp(self, node: NodeInfo) -> None:
        with self._lock:
            held = self._tcp.get(node.node_id)
            if held is None or held[0] != node:
                return
            del self._tcp[node.node_id]
        held[1].close()

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
            tcps, self._tcp = list(self._tcp.values()), {}
        for _, channel in channels:
            channel.close()
        for _, t in tcps:
            t.close()
