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

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from prometheus_client import CollectorRegistry

from kvstore.auth import open_channel, token_from_env
from kvstore.block_object import BlockLayout, BlockObject, Rejection, check_object, encode_object
from kvstore.config import ClientConfig
from kvstore.errors import ObjectTooLargeError
from kvstore.hostid import default_host_id
from kvstore.limits import check_key
from kvstore.metadata import BlockLocation, NodeInfo, ObjectEntry, PoolStatus
from kvstore.metrics import ClientMetrics
from kvstore.transports import Transport, TransportError
from kvstore.transports.grpc import GrpcTransport
from kvstore.transports.shm import ShmTransport
from kvstore.transports.tcp import TcpTransport
from kvstore.wire import (
    grant_from_proto,
    location_from_proto,
    node_from_proto,
    object_from_proto,
    status_from_proto,
)
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["BlockLayout", "BlockLocation", "Fetched", "KVStoreClient", "ObjectEntry",
           "PoolStatus", "PrefixMatch"]


@dataclass(frozen=True)
class PrefixMatch:
    matched: int
    locations: tuple[BlockLocation, ...]
    # The nodes the locations name, as the master knew them when it answered.
    nodes: tuple[NodeInfo, ...] = ()


@dataclass(frozen=True)
class Fetched:
    """What a read got, per key asked: the checked object (None: a miss), why bytes read for it
    were refused (None: nothing refused), and how many bytes came back in all."""

    objects: tuple[BlockObject | None, ...]
    rejected: tuple[Rejection | None, ...]
    nbytes: int


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
        self._channel = open_channel(master_address, self._token)
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
        resp = self._master.MatchPrefix(self._keys(keys), timeout=self.config.rpc_timeout_s)
        self._saw_membership(resp.membership)
        return PrefixMatch(resp.matched, tuple(location_from_proto(x) for x in resp.locations),
                           tuple(node_from_proto(n) for n in resp.nodes))

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
                 layout: BlockLayout | None = None) -> list[bool]:
        """Store payloads; True per item that is now stored (written, or already sealed).

        Each payload is stored as an object that records its key and `layout` (plain bytes,
        `BlockLayout.raw`, when None). Never raises for lack of space (that is False); raises
        InvalidKeyError for a key outside the key syntax and ObjectTooLargeError for an object
        above max_object_bytes, before anything is allocated.
        """
        if not items:
            return []
        keys = [k for k, _ in items]
        for i, key in enumerate(keys):
            check_key(key, f"items[{i}]")
        objects = [encode_object(k, layout or BlockLayout.raw(memoryview(d).nbytes), d)
                   for k, d in items]
        sizes = [len(o) for o in objects]
        limit = self.config.max_object_bytes
        for key, size in zip(keys, sizes, strict=True):
            if size > limit:
                raise ObjectTooLargeError(
                    f"object {key} is {size} bytes; max_object_bytes is {limit}")
        resp = self._master.PutStart(
            pb.PutStartRequest(keys=keys, sizes=sizes, client_host_id=self.host_id),
            timeout=self.config.rpc_timeout_s)
        self._saw_membership(resp.membership)
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
        written: list[pb.PutTicket] = []
        failed: list[pb.PutTicket] = []
        for node_id, idxs in by_node.items():
            tickets = [pb.PutTicket(key=keys[i], token=resp.slots[i].grant.token) for i in idxs]
            transport = None if too_large or node_id not in nodes else self._transport(
                nodes[node_id])
            if transport is None:
                failed.extend(tickets)
                continue
            ops = [(grant_from_proto(resp.slots[i].grant), objects[i]) for i in idxs]
            try:
                transport.write(ops)
                written.extend(tickets)
            except TransportError as e:
                log.warning("write to node %s failed: %s", node_id, e)
                self._drop_transport(nodes[node_id], "error")
                failed.extend(tickets)
        if failed:
            self._master.PutAbort(pb.PutFinishRequest(puts=failed),
                                  timeout=self.config.rpc_timeout_s)
        if written:
            sealed = self._master.PutEnd(pb.PutFinishRequest(puts=written),
                                         timeout=self.config.rpc_timeout_s).sealed
            stored.update(t.key for t, ok in zip(written, sealed, strict=True) if ok)
        if too_large:
            raise ObjectTooLargeError(
                f"master rejected {too_large[0]} as larger than its max_object_bytes "
                f"{resp.max_object_bytes}")
        return [k in stored for k in keys]

    def get_objects(self, keys: Sequence[str], layout: BlockLayout | None = None) -> Fetched:
        """The checked object per key (key, `layout` when given, length, checksum); a key whose
        object is absent, unreachable or fails a check is a miss (None)."""
        if not keys:
            return Fetched((), (), 0)
        resp = self._master.GetReplicas(self._keys(keys), timeout=self.config.rpc_timeout_s)
        self._saw_membership(resp.membership)
        locations = [location_from_proto(r.location) if r.found else None
                     for r in resp.replicas]
        return self._read(keys, locations, [node_from_proto(n) for n in resp.nodes], layout)

    def read(self, match: PrefixMatch, layout: BlockLayout | None = None) -> Fetched:
        """The objects at the locations of a prefix match, checked like `get_objects`, without
        asking the master again. A location of a node's older epoch is a miss."""
        keys = [loc.key for loc in match.locations]
        return self._read(keys, list(match.locations), list(match.nodes), layout)

    def get_many(self, keys: Sequence[str],
                 layout: BlockLayout | None = None) -> list[bytes | None]:
        """The payload per key, checked as `get_objects` does; None for a miss."""
        return [None if o is None else bytes(o.payload)
                for o in self.get_objects(keys, layout).objects]

    def _read(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
              node_list: Sequence[NodeInfo], layout: BlockLayout | None) -> Fetched:
        nodes = {n.node_id: n for n in node_list}
        objects: list[BlockObject | None] = [None] * len(keys)
        rejected: list[Rejection | None] = [None] * len(keys)
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, loc in enumerate(locations):
            node = None if loc is None else nodes.get(loc.node_id)
            # A location is read only from the registration it was handed out for.
            if loc is not None and node is not None and node.epoch == loc.epoch:
                by_node[loc.node_id].append(i)
        nbytes = 0
        for node_id, idxs in by_node.items():
            transport = self._transport(nodes[node_id])
            if transport is None:
                continue
            ops = [(loc.offset, loc.length) for loc in (locations[i] for i in idxs)
                   if loc is not None]
            start = time.perf_counter()
            try:
                data = transport.read(ops)
            except TransportError as e:
                log.warning("read from node %s failed: %s", node_id, e)
                self._drop_transport(nodes[node_id], "error")
                continue
            self.metrics.read_seconds.labels(transport.name).observe(
                time.perf_counter() - start)
            for i, d in zip(idxs, data, strict=True):
                nbytes += len(d)
                got = check_object(d, keys[i], layout)
                if isinstance(got, Rejection):
                    log.warning("object read for %s refused: %s", keys[i], got.value)
                    self.metrics.rejected.labels(got.value).inc()
                    rejected[i] = got
                else:
                    objects[i] = got
        return Fetched(tuple(objects), tuple(rejected), nbytes)

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
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
