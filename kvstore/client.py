"""KVStoreClient: what engines, the conductor and the CLI use to find, store and fetch objects.

Every object is stored with a header that names the key it was written for and its layout
(`kvstore.block_object`), and every read is checked here, in the client, before anything is
returned: the key, the layout when the caller states one, the length and the payload checksum.
Bytes that fail a check are a miss, counted by reason in `pantry_kv_client_objects_rejected`;
no caller ever receives another key's bytes, whatever happened to the slot (a lease that ran
out mid-read, a late writer, a node that restarted).

Transports are held per node and per registration (epoch): when the master names a node in a
newer epoch, or the membership changes and a node is gone, the client closes what it held for
the old one (a stale shared-memory mapping keeps a dead segment's memory alive).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Collection, Sequence
from types import TracebackType

import grpc
from prometheus_client import CollectorRegistry

from kvstore.auth import token_from_env
from kvstore.block_object import BlockLayout, BlockObject
from kvstore.config import ClientConfig
from kvstore.hostid import default_host_id
from kvstore.limits import check_key
from kvstore.master_link import MasterLink
from kvstore.metadata import BlockLocation, DrainState, NodeInfo, ObjectEntry, PoolStatus
from kvstore.metrics import ClientMetrics
from kvstore.placement import Placement
from kvstore.prefix_match import PrefixMatch, compact_from_proto, pack_keys
from kvstore.reader import CallerBufferError, Fetched, Reader
from kvstore.transports import Transport
from kvstore.transports.grpc import GrpcTransport
from kvstore.transports.rdma import RdmaTransport, RdmaUnavailable, has_rdma_device
from kvstore.transports.shm import ShmTransport
from kvstore.transports.ssd import SsdReader
from kvstore.transports.tcp import TcpTransport
from kvstore.wire import (
    drain_from_proto,
    location_from_proto,
    node_from_proto,
    object_from_proto,
    status_from_proto,
)
from kvstore.writer import PutResult, Writer
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["BlockLayout", "BlockLocation", "DrainState", "Fetched", "KVStoreClient",
           "ObjectEntry", "PoolStatus", "PrefixMatch", "PutResult"]


class KVStoreClient:
    def __init__(self, master_address: str, *, host_id: str | None = None,
                 config: ClientConfig | None = None,
                 registry: CollectorRegistry | None = None, token: str | None = None) -> None:
        """`registry`: where the client's metrics go (e.g. the engine's own); a fresh one of the
        client's (`self.metrics.registry`) when None. `token`: the pool's service token, sent
        on every call to the master and the nodes; None reads the file $PANTRY_TOKEN_FILE
        names (no token when it is unset)."""
        self.config = config or ClientConfig()
        self.host_id = host_id or default_host_id()
        self.metrics = ClientMetrics(registry or CollectorRegistry())
        self._token = token_from_env() if token is None else token
        # `master_address`: one master, or a leader and its standbys comma-separated; the link
        # follows the leader.
        self._channel = MasterLink(master_address, self._token)
        # Reads of SSD replicas: same host from the node's files, else through the node.
        self._ssd = SsdReader(self.host_id, self._token, self.config.rpc_timeout_s,
                              self.config.max_message_bytes, self.config.enable_tcp,
                              self.config.batch_bytes)
        self._master = pb_grpc.KVMasterStub(self._channel)
        self._lock = threading.Lock()
        # Per node id, the registration (NodeInfo with its epoch) a transport was opened for.
        self._transports: dict[str, tuple[NodeInfo, Transport]] = {}
        self._membership: int | None = None
        self._closed = False

    # ---- transports -------------------------------------------------------------------------

    def _transport(self, node: NodeInfo) -> Transport | None:
        """The transport to `node`'s registration; None when the client already holds a newer
        one (the caller's location is of an old epoch and must not be read)."""
        with self._lock:
            held = self._transports.get(node.node_id)
            if held is not None and held[0] == node:
                return held[1]
            if held is not None and held[0].epoch > node.epoch:
                return None
            t = self._open_transport(node)
            self._transports[node.node_id] = (node, t)
            self.metrics.transports_open.set(len(self._transports))
        if held is not None:
            log.info("node %s is in epoch %d now (was %d); reopening its transport",
                     node.node_id, node.epoch, held[0].epoch)
            self.metrics.transports_dropped.labels("epoch").inc()
            held[1].close()
        return t

    def _open_transport(self, node: NodeInfo) -> Transport:
        if (self.config.enable_shm and node.host_id == self.host_id and node.segment_path
                and os.path.exists(node.segment_path)):
            try:
                return ShmTransport(node.segment_path, node.segment_size)
            except OSError as e:
                log.info("shm to node %s unavailable (%s); using grpc", node.node_id, e)
        if self.config.enable_rdma and has_rdma_device():
            # Both ends need a device: the node says whether it has one when asked to connect.
            try:
                return RdmaTransport(node.address, node.epoch, self._token,
                                     self.config.rpc_timeout_s, self.config.batch_bytes)
            except RdmaUnavailable as e:
                log.info("rdma to node %s unavailable (%s); using tcp", node.node_id, e)
        if self.config.enable_tcp and node.tcp_address:
            return TcpTransport(node.tcp_address, self.config.rpc_timeout_s, node.epoch,
                                self.config.batch_bytes, self._token)
        return GrpcTransport(node.address, self.config.max_message_bytes,
                             self.config.batch_bytes, self.config.rpc_timeout_s, node.epoch,
                             self._token)

    def transport_name(self, node: NodeInfo) -> str:
        """Which transport this client uses for `node` (for logs, tests and benchmarks)."""
        t = self._transport(node)
        return "" if t is None else t.name

    def _drop_transport(self, node: NodeInfo, reason: str) -> None:
        with self._lock:
            held = self._transports.get(node.node_id)
            if held is None or held[0] != node:
                return
            del self._transports[node.node_id]
            self.metrics.transports_open.set(len(self._transports))
        self.metrics.transports_dropped.labels(reason).inc()
        held[1].close()

    def _prune(self, alive: Sequence[NodeInfo]) -> None:
        """Let go of every transport whose node is not in `alive` as that registration."""
        current = {n.node_id: n for n in alive}
        with self._lock:
            stale = [(nid, held) for nid, held in self._transports.items()
                     if current.get(nid) != held[0]]
            for nid, _ in stale:
                del self._transports[nid]
            self.metrics.transports_open.set(len(self._transports))
        for nid, (_, t) in stale:
            self.metrics.transports_dropped.labels("epoch" if nid in current else "gone").inc()
            t.close()

    def _saw_membership(self, membership: int) -> None:
        """The master's membership changed since we last looked: refresh and prune."""
        if membership == self._membership:
            return
        first = self._membership is None
        self._membership = membership
        if not first or self._transports:
            self.status()

    # ---- queries ----------------------------------------------------------------------------

    def _keys(self, keys: Sequence[str]) -> pb.KeysRequest:
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
        return pb.KeysRequest(keys=list(keys), client_host_id=self.host_id)

    def match_prefix(self, keys: Sequence[str]) -> PrefixMatch:
        """The longest run of leading keys the pool holds, and where each lives (leased for
        the master's lease_ms: read them with `read` or `read_into` within it). Block keys
        travel packed and the answer comes as packed columns (`kvstore.prefix_match`)."""
        packed = pack_keys(keys)
        if packed is None:
            req = self._keys(keys)
        else:
            req = pb.KeysRequest(packed_keys=packed, client_host_id=self.host_id)
        req.compact = req.packed_columns = True
        resp = self._master.MatchPrefix(req, timeout=self.config.rpc_timeout_s)
        self._saw_membership(resp.membership)
        return compact_from_proto(keys, resp)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        resp = self._master.Exists(self._keys(keys), timeout=self.config.rpc_timeout_s)
        return list(resp.exists)

    def remove(self, keys: Sequence[str]) -> int:
        return int(self._master.Remove(self._keys(keys),
                                       timeout=self.config.rpc_timeout_s).removed)

    def status(self) -> PoolStatus:
        """The pool as the master sees it; transports of nodes gone or restarted are closed."""
        s = status_from_proto(self._master.Status(pb.StatusRequest(),
                                                  timeout=self.config.rpc_timeout_s))
        self._membership = s.membership
        self._prune([n.node for n in s.nodes])
        return s

    def evict(self, *, nbytes: int = 0, prefix: str = "", everything: bool = False
              ) -> tuple[int, int]:
        """Evict at least `nbytes` (least recently used first), every object under `prefix`,
        or `everything`: exactly one. (objects, slot bytes) evicted."""
        r = self._master.Evict(pb.EvictRequest(bytes=nbytes, prefix=prefix, all=everything),
                               timeout=self.config.rpc_timeout_s)
        return int(r.evicted), int(r.bytes)

    def list_objects(self, prefix: str = "", limit: int = 100) -> tuple[list[ObjectEntry], bool]:
        """Objects in key order (at most `limit`), and whether more were left out."""
        r = self._master.List(pb.ListRequest(prefix=prefix, limit=limit),
                              timeout=self.config.rpc_timeout_s)
        return [object_from_proto(o) for o in r.objects], r.truncated

    # ---- data -------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]],
                 layout: BlockLayout | None = None, replicas: int | None = None) -> list[bool]:
        """Store payloads; True per item that is now stored (written, or already sealed).

        Each payload is stored as an object that records its key and `layout` (plain bytes,
        `BlockLayout.raw`, when None), in `replicas` copies on distinct nodes (None: the pool's
        default; fewer when the pool has fewer nodes). Never raises for lack of space (that is
        False); raises InvalidKeyError for a key outside the key syntax and ObjectTooLargeError
        for an object above max_object_bytes, before anything is allocated.
        """
        return self._writer.put_many(items, layout, replicas)

    def move(self, objects: Sequence[BlockObject], from_node: str) -> list[PutResult]:
        """Copy each (checked) object to a node that holds no replica of it; once sealed, the
        copy replaces the object's replica on `from_node` (kvstore drain). Per object: STORED
        (moved), NO_SPACE (no node can take it), GONE (no replica there any more), BUSY (a put
        of it is under way) or FAILED (a write failed; try again)."""
        return self._writer.move(objects, from_node)

    def drain(self, node_id: str, limit: int = 1024, drop: Sequence[str] = (),
              cancel: bool = False) -> DrainState:
        """One step of a drain (kvstore.drain runs the whole of it): the node takes no new
        objects (again, with `cancel`), its replicas of `drop` are given up, and up to `limit`
        of its sealed keys still to move are listed. Unknown node: grpc NOT_FOUND."""
        resp = self._master.Drain(pb.DrainRequest(node_id=node_id, limit=limit, drop=list(drop),
                                                  cancel=cancel),
                                  timeout=self.config.rpc_timeout_s)
        return drain_from_proto(node_id, resp)

    @functools.cached_property
    def _writer(self) -> Writer:
        return Writer(self._master, self.config, self.host_id, self._transport,
                      self._drop_transport, self._saw_membership)

    def get_objects(self, keys: Sequence[str], layout: BlockLayout | None = None) -> Fetched:
        """The checked object per key (key, `layout` when given, length, checksum); a key whose
        object is absent, unreachable or fails a check is a miss (None)."""
        if not keys:
            return Fetched((), (), 0)
        locations, nodes = self._locate(keys)
        return self._read(keys, locations, nodes, layout)

    def _locate(self, keys: Sequence[str]
                ) -> tuple[list[BlockLocation | None], list[NodeInfo]]:
        """One leased location per key (None: not stored) and the nodes they name."""
        resp = self._master.GetReplicas(self._keys(keys), timeout=self.config.rpc_timeout_s)
        self._saw_membership(resp.membership)
        return _replicas_from_proto(resp)

    def read(self, match: PrefixMatch, layout: BlockLayout | None = None) -> Fetched:
        """The objects at the locations of a prefix match, checked like `get_objects`, without
        asking the master again. A location of a node's older epoch is a miss."""
        return self._reader.read(Placement.of_match(match), layout)

    def read_into(self, target: PrefixMatch | Sequence[str], buffers: Sequence[object],
                  layout: BlockLayout | None = None) -> Fetched:
        """Each object's payload straight into `buffers[i]`, memory the caller owns: the
        objects of a prefix match's locations (no second master round trip), or of `keys`
        (looked up first). Only as many objects as there are buffers are read.

        The buffer contract: `buffers[i]` is anything writable and contiguous that exports
        the buffer protocol (bytearray, a numpy array, `memoryview(t.view(torch.uint8)
        .numpy())` of a torch tensor's storage), of exactly the object's payload size. Only the
        payload lands in it; the object's header is read aside into a small scratch. So an
        engine pulls a block straight into its paged cache with one copy from the node: a
        memcpy out of the segment (shm), the kernel's copy out of the socket (tcp, recv_into);
        gRPC, the fallback, copies out of its response.

        Each object is checked after it lands (key, `layout`, length, checksum): one that fails
        is a miss (None in `objects`, the reason in `rejected`), and what its buffer then holds
        is unspecified, as for any miss. A hit's `payload` is a byte view of its buffer.
        `layout`: what the objects were stored as; None reads plain bytes (`put_many` without
        a layout), each exactly as long as its buffer.

        Raises CallerBufferError (a ValueError and a KVStoreError) before reading anything when
        there are more buffers than keys, or a buffer is read-only, not contiguous, or not
        exactly the size of the payload its location holds (the message names the index and
        both sizes)."""
        if isinstance(target, PrefixMatch):
            if len(buffers) > target.matched:
                raise CallerBufferError(f"{len(buffers)} buffers for {target.matched} objects")
            # Straight from the match's columns: no object per location.
            return self._reader.read_into(Placement.of_match(target, len(buffers)), buffers,
                                          layout)
        keys = list(target)
        if len(buffers) > len(keys):
            raise CallerBufferError(f"{len(buffers)} buffers for {len(keys)} keys")
        keys = keys[: len(buffers)]
        if not keys:
            return Fetched((), (), 0)
        locations, nodes = self._locate(keys)
        return self._reader.read_into(Placement.of_locations(keys, locations, nodes), buffers,
                                      layout)

    @functools.cached_property
    def _reader(self) -> Reader:
        return Reader(self._transport, self._drop_transport, self.metrics, self._ssd,
                      self._relocate)

    def _relocate(self, keys: Sequence[str], exclude: Collection[str]
                  ) -> tuple[list[BlockLocation | None], list[NodeInfo]]:
        """Another replica of each of `keys`, on none of the `exclude`d nodes (the reader
        failed on them); None where there is none, or the master cannot be asked now (the
        keys are then misses, as they would have been)."""
        req = self._keys(keys)
        req.exclude_nodes.extend(sorted(exclude))
        try:
            resp = self._master.GetReplicas(req, timeout=self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            log.warning("no other replica asked for %d keys: %s", len(keys), e)
            return [None] * len(keys), []
        return _replicas_from_proto(resp)

    def get_many(self, keys: Sequence[str],
                 layout: BlockLayout | None = None) -> list[bytes | None]:
        """The payload per key, checked as `get_objects` does; None for a miss."""
        return [None if o is None else bytes(o.payload)
                for o in self.get_objects(keys, layout).objects]

    def _read(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
              node_list: Sequence[NodeInfo], layout: BlockLayout | None) -> Fetched:
        return self._reader.read(Placement.of_locations(keys, locations, node_list), layout)

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transports = [t for _, t in self._transports.values()]
            self._transports.clear()
        for t in transports:
            t.close()
        self._ssd.close()
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _replicas_from_proto(resp: pb.GetReplicasResponse
                         ) -> tuple[list[BlockLocation | None], list[NodeInfo]]:
    """A GetReplicas answer: the location per key (None: none found) and the nodes named."""
    return ([location_from_proto(r.location) if r.found else None for r in resp.replicas],
            [node_from_proto(n) for n in resp.nodes])
