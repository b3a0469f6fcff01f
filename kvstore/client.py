"""KVStoreClient: what engines use to find, store and fetch KV blocks in the pool.

Reads return the raw stored bytes. A read that races an eviction is prevented by the lease the
master grants with every location (a leased object is not evicted or reused), and is detected
anyway if it happens (lease ran out mid-copy, node restarted): callers verify with
`kvstore.block_object.decode_block`, which rejects bytes that are not the intact object.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from kvstore.config import ClientConfig
from kvstore.errors import ObjectTooLargeError
from kvstore.hostid import default_host_id
from kvstore.metadata import BlockLocation, NodeInfo, ObjectEntry, PoolStatus
from kvstore.transports import Transport, TransportError
from kvstore.transports.grpc import GrpcTransport
from kvstore.transports.shm import ShmTransport
from kvstore.transports.tcp import TcpTransport
from kvstore.wire import location_from_proto, node_from_proto, object_from_proto, status_from_proto
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["BlockLocation", "KVStoreClient", "ObjectEntry", "PoolStatus", "PrefixMatch"]


@dataclass(frozen=True)
class PrefixMatch:
    matched: int
    locations: tuple[BlockLocation, ...]


class KVStoreClient:
    def __init__(self, master_address: str, *, host_id: str | None = None,
                 config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self.host_id = host_id or default_host_id()
        self._channel = grpc.insecure_channel(master_address)
        self._master = pb_grpc.KVMasterStub(self._channel)
        self._lock = threading.Lock()
        # Keyed by the node's full identity: a node that re-registers with a new segment or
        # address gets a fresh transport, never a stale mapping.
        self._transports: dict[NodeInfo, Transport] = {}
        self._closed = False

    # ---- transports -------------------------------------------------------------------------

    def _transport(self, node: NodeInfo) -> Transport:
        with self._lock:
            t = self._transports.get(node)
            if t is not None:
                return t
            t = self._open_transport(node)
            self._transports[node] = t
            return t

    def _open_transport(self, node: NodeInfo) -> Transport:
        if (self.config.enable_shm and node.host_id == self.host_id and node.segment_path
                and os.path.exists(node.segment_path)):
            try:
                return ShmTransport(node.segment_path, node.segment_size)
            except OSError as e:
                log.info("shm to node %s unavailable (%s); using grpc", node.node_id, e)
        if self.config.enable_tcp and node.tcp_address:
            return TcpTransport(node.tcp_address, self.config.rpc_timeout_s)
        return GrpcTransport(node.address, self.config.max_message_bytes,
                             self.config.batch_bytes, self.config.rpc_timeout_s)

    def transport_name(self, node: NodeInfo) -> str:
        """Which transport this client uses for `node` (for logs, tests and benchmarks)."""
        return self._transport(node).name

    # ---- queries ----------------------------------------------------------------------------

    def _keys(self, keys: Sequence[str]) -> pb.KeysRequest:
        return pb.KeysRequest(keys=list(keys), client_host_id=self.host_id)

    def match_prefix(self, keys: Sequence[str]) -> PrefixMatch:
        resp = self._master.MatchPrefix(self._keys(keys), timeout=self.config.rpc_timeout_s)
        return PrefixMatch(resp.matched, tuple(location_from_proto(x) for x in resp.locations))

    def exists(self, keys: Sequence[str]) -> list[bool]:
        resp = self._master.Exists(self._keys(keys), timeout=self.config.rpc_timeout_s)
        return list(resp.exists)

    def remove(self, keys: Sequence[str]) -> int:
        return int(self._master.Remove(self._keys(keys),
                                       timeout=self.config.rpc_timeout_s).removed)

    def status(self) -> PoolStatus:
        return status_from_proto(self._master.Status(pb.StatusRequest(),
                                                     timeout=self.config.rpc_timeout_s))

    def list_objects(self, prefix: str = "", limit: int = 100) -> tuple[list[ObjectEntry], bool]:
        """Objects in key order (at most `limit`), and whether more were left out."""
        r = self._master.List(pb.ListRequest(prefix=prefix, limit=limit),
                              timeout=self.config.rpc_timeout_s)
        return [object_from_proto(o) for o in r.objects], r.truncated

    # ---- data -------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]]) -> list[bool]:
        """Store objects; True per item that is now stored (written, or already sealed).

        Never raises for lack of space (that is False); raises ObjectTooLargeError for an
        object above max_object_bytes, before anything is allocated.
        """
        if not items:
            return []
        sizes = [memoryview(data).nbytes for _, data in items]
        limit = self.config.max_object_bytes
        for (key, _), size in zip(items, sizes, strict=True):
            if size > limit:
                raise ObjectTooLargeError(
                    f"object {key} is {size} bytes; max_object_bytes is {limit}")
        keys = [k for k, _ in items]
        resp = self._master.PutStart(
            pb.PutStartRequest(keys=keys, sizes=sizes, client_host_id=self.host_id),
            timeout=self.config.rpc_timeout_s)
        nodes = {n.node_id: node_from_proto(n) for n in resp.nodes}
        by_node: dict[str, list[int]] = defaultdict(list)
        stored: set[str] = set()
        too_large: list[str] = []
        for i, slot in enumerate(resp.slots):
            if slot.state == pb.PUT_STATE_ALLOCATED:
                by_node[slot.location.node_id].append(i)
            elif slot.state == pb.PUT_STATE_EXISTS:
                stored.add(keys[i])
            elif slot.state == pb.PUT_STATE_TOO_LARGE:
                too_large.append(keys[i])
        written: list[str] = []
        failed: list[str] = []
        for node_id, idxs in by_node.items():
            ks = [keys[i] for i in idxs]
            if too_large or node_id not in nodes:
                failed.extend(ks)
                continue
            ops = [(resp.slots[i].location.offset, items[i][1]) for i in idxs]
            try:
                self._transport(nodes[node_id]).write(ops)
                written.extend(ks)
            except TransportError as e:
                log.warning("write to node %s failed: %s", node_id, e)
                self._drop_transport(nodes[node_id])
                failed.extend(ks)
        if failed:
            self._master.PutAbort(self._keys(failed), timeout=self.config.rpc_timeout_s)
        if written:
            sealed = self._master.PutEnd(self._keys(written),
                                         timeout=self.config.rpc_timeout_s).sealed
            stored.update(k for k, ok in zip(written, sealed, strict=True) if ok)
        if too_large:
            raise ObjectTooLargeError(
                f"master rejected {too_large[0]} as larger than its max_object_bytes "
                f"{resp.max_object_bytes}")
        return [k in stored for k in keys]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Raw object bytes per key; None for a miss (absent, evicted, node gone, read failed)."""
        out: list[bytes | None] = [None] * len(keys)
        if not keys:
            return out
        resp = self._master.GetReplicas(self._keys(keys), timeout=self.config.rpc_timeout_s)
        nodes = {n.node_id: node_from_proto(n) for n in resp.nodes}
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, rep in enumerate(resp.replicas):
            if rep.found and rep.location.node_id in nodes:
                by_node[rep.location.node_id].append(i)
        for node_id, idxs in by_node.items():
            ops = [(resp.replicas[i].location.offset, resp.replicas[i].location.length)
                   for i in idxs]
            try:
                data = self._transport(nodes[node_id]).read(ops)
            except TransportError as e:
                log.warning("read from node %s failed: %s", node_id, e)
                self._drop_transport(nodes[node_id])
                continue
            for i, d in zip(idxs, data, strict=True):
                out[i] = d
        return out

    def _drop_transport(self, node: NodeInfo) -> None:
        with self._lock:
            t = self._transports.pop(node, None)
        if t is not None:
            t.close()

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transports = list(self._transports.values())
            self._transports.clear()
        for t in transports:
            t.close()
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
