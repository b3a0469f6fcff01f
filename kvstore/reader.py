"""The client's read path: objects fetched from their locations and checked, either into fresh
memory (`Reader.read`) or straight into memory the caller owns (`Reader.read_into`).

Reads from several nodes run at once on a small shared thread pool: the copies that move the
bytes (a socket's recv_into, numpy's memcpy out of a shared-memory segment) release the GIL.
Every object is checked after it lands (key, layout, length, checksum); one that fails is a
miss, counted by reason, and never handed to the caller.

A read that fails on one replica tries another: the keys whose location could not be read (the
node unreachable, its registration gone, the bytes refused by a check) are asked of the master
again with those nodes excluded, and read from the replica it hands instead, until every key is
read or has no replica left. So after a node dies, reads go on succeeding from the other
replicas at once, not only once the master has dropped the dead node (node_timeout_s later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from kvstore.block_object import (
    BlockLayout,
    BlockObject,
    Rejection,
    check_object,
    check_parts,
    header_size,
)
from kvstore.config import MAX_REPLICAS
from kvstore.errors import KVStoreError
from kvstore.metadata import SSD, BlockLocation, NodeInfo
from kvstore.metrics import ClientMetrics
from kvstore.transports import ReadInto, Transport, TransportError
from kvstore.transports.ssd import SsdReader

log = logging.getLogger(__name__)

# Threads that read from different nodes at once (one node's reads stay on one thread, in
# order, over one connection).
READ_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """One pool for every client of the process (its parallel reads, and the writer's master
    calls overlapped with hashing): idle threads cost nothing, and a client need not own (and
    close) one."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kv-read")
        return _pool


class CallerBufferError(KVStoreError, ValueError):
    """A caller's buffer cannot take the object it is to receive: not writable, not contiguous,
    or not exactly the payload's size (raised before any byte is read; the message names the
    buffer's index and the sizes). A KVStoreError, so a caller that computes whatever the pool
    cannot give does that here too."""


@dataclass(frozen=True)
class Fetched:
    """What a read got, per key asked: the checked object (None: a miss), why bytes read for it
    were refused (None: nothing refused), and how many bytes came back in all."""

    objects: tuple[BlockObject | None, ...]
    rejected: tuple[Rejection | None, ...]
    nbytes: int


R = TypeVar("R")
TransportFor = Callable[[NodeInfo], "Transport | None"]
DropTransport = Callable[[NodeInfo, str], None]
# (keys, node ids to avoid) -> a location per key on another node (None: no other replica) and
# the nodes they are on: the master's GetReplicas with exclude_nodes.
Relocate = Callable[[Sequence[str], Collection[str]],
                    tuple[list[BlockLocation | None], list[NodeInfo]]]
# Read again the keys at these indices, from these locations on these nodes.
ReadAgain = Callable[[list[int], list[BlockLocation | None], list[NodeInfo]], Fetched]


class Reader:
    """Reads for one client: `transport_for(node)` gives the node's transport (None: the
    location is of an older registration than the one the client holds), `drop(node, reason)`
    lets go of a transport that failed, `relocate` finds a key another replica (None: a failed
    read is a miss at once)."""

    def __init__(self, transport_for: TransportFor, drop: DropTransport,
                 metrics: ClientMetrics, ssd: SsdReader | None = None,
                 relocate: Relocate | None = None) -> None:
        self._transport_for = transport_for
        self._drop = drop
        self._metrics = metrics
        self._ssd = ssd  # reads of SSD replicas (tier "ssd"); None: they are misses
        self._relocate = relocate

    def read(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
             node_list: Sequence[NodeInfo], layout: BlockLayout | None) -> Fetched:
        """The object per key at its location, checked (`layout`: any when None); a key whose
        location fails is read from another replica."""
        def again(idxs: list[int], locs: list[BlockLocation | None],
                  nodes: list[NodeInfo]) -> Fetched:
            return self._read_once([keys[i] for i in idxs], locs, nodes, layout)

        got = self._read_once(keys, locations, node_list, layout)
        return self._fail_over(keys, locations, got, again)

    def _read_once(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                   node_list: Sequence[NodeInfo], layout: BlockLayout | None) -> Fetched:
        objects: list[BlockObject | None] = [None] * len(keys)
        rejected: list[Rejection | None] = [None] * len(keys)

        def one_node(node: NodeInfo, idxs: list[int]) -> int:
            ops = [(loc.offset, loc.length) for loc in _at(locations, idxs)]
            done, data = self._transfer(node, lambda t: t.read(ops))
            if not done:
                return 0
            assert data is not None
            for i, d in zip(idxs, data, strict=True):
                self._settle(i, keys[i], check_object(d, keys[i], layout), objects, rejected)
            return sum(len(d) for d in data)

        def one_ssd(node: NodeInfo, idxs: list[int], ssd: SsdReader) -> int:
            locs = _at(locations, idxs)
            data = ssd.read(node, [keys[i] for i in idxs], [loc.length for loc in locs])
            for i, d in zip(idxs, data, strict=True):
                self._settle(i, keys[i], check_object(d, keys[i], layout), objects, rejected)
            return sum(len(d) for d in data)

        nbytes = self._each_ssd_node(keys, locations, node_list, one_ssd)
        nbytes += self._each_node(keys, _in_dram(locations), node_list, one_node)
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    def read_into(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                  node_list: Sequence[NodeInfo], buffers: Sequence[object],
                  layout: BlockLayout | None) -> Fetched:
        """Each object's payload straight into `buffers[i]`; see `KVStoreClient.read_into`. A
        key whose location fails is read from another replica, into the same buffer."""
        def again(idxs: list[int], locs: list[BlockLocation | None],
                  nodes: list[NodeInfo]) -> Fetched:
            return self._read_into_once([keys[i] for i in idxs], locs, nodes,
                                        [buffers[i] for i in idxs], layout)

        got = self._read_into_once(keys, locations, node_list, buffers, layout)
        n = len(buffers)
        return self._fail_over(keys[:n], locations[:n], got, again)

    def _read_into_once(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                        node_list: Sequence[NodeInfo], buffers: Sequence[object],
                        layout: BlockLayout | None) -> Fetched:
        if len(buffers) > len(keys):
            raise CallerBufferError(f"{len(buffers)} buffers for {len(keys)} objects")
        n = len(buffers)
        views = [_writable(b, i) for i, b in enumerate(buffers)]
        layouts = [layout or BlockLayout.raw(v.nbytes) for v in views]
        heads = [header_size(keys[i], layouts[i]) for i in range(n)]
        for i in range(n):
            loc = locations[i]
            if loc is not None and loc.length != heads[i] + views[i].nbytes:
                raise CallerBufferError(
                    f"buffers[{i}] is {views[i].nbytes} bytes; the object of {keys[i]} holds "
                    f"{loc.length - heads[i]} bytes of payload ({loc.length} with its "
                    f"{heads[i]}-byte header): pass a buffer of exactly the payload's size")
        objects: list[BlockObject | None] = [None] * n
        rejected: list[Rejection | None] = [None] * n

        def one_node(node: NodeInfo, idxs: list[int]) -> int:
            # The header lands aside, in a scratch of its exact size; the payload lands where
            # the caller wants it, so the copy out of the node is the only one.
            scratch = {i: memoryview(bytearray(heads[i])) for i in idxs}
            ops: list[ReadInto] = [(loc.offset, (scratch[i], views[i]))
                                   for i, loc in zip(idxs, _at(locations, idxs), strict=True)]
            if not self._transfer(node, lambda t: t.read_into(ops))[0]:
                return 0
            for i in idxs:
                got = check_parts(scratch[i], views[i], keys[i], layouts[i])
                self._settle(i, keys[i], got, objects, rejected)
            return sum(heads[i] + views[i].nbytes for i in idxs)

        def one_ssd(node: NodeInfo, idxs: list[int], ssd: SsdReader) -> int:
            # The node's objects in one call (one request when they come over tcp).
            scratch = {i: memoryview(bytearray(heads[i])) for i in idxs}
            got = ssd.read_many_into(node, [(keys[i], [scratch[i], views[i]]) for i in idxs])
            moved = 0
            for i, ok in zip(idxs, got, strict=True):
                if ok:
                    self._settle(i, keys[i], check_parts(scratch[i], views[i], keys[i],
                                                         layouts[i]), objects, rejected)
                    moved += heads[i] + views[i].nbytes
            return moved

        nbytes = self._each_ssd_node(keys[:n], locations[:n], node_list, one_ssd)
        nbytes += self._each_node(keys[:n], _in_dram(locations[:n]), node_list, one_node)
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    # ---- shared -----------------------------------------------------------------------------

    def _fail_over(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                   got: Fetched, again: ReadAgain) -> Fetched:
        """`got`, with each key that had a location but was not read (node unreachable, not
        the registration the location names, bytes refused) read again from a replica on a
        node not tried yet, for as long as the master hands one. A key read in the end has no
        rejection; one never read keeps its last."""
        if self._relocate is None:
            return got
        objects, rejected, nbytes = list(got.objects), list(got.rejected), got.nbytes
        tried = {i: loc for i, loc in enumerate(locations[: len(objects)])
                 if loc is not None and objects[i] is None}
        excluded: set[str] = set()
        # Each round excludes at least one more node: at most one round per other replica.
        for _ in range(MAX_REPLICAS - 1):
            if not tried:
                break
            excluded.update(loc.node_id for loc in tried.values())
            idxs = list(tried)
            locs, nodes = self._relocate([keys[i] for i in idxs], excluded)
            found = [(i, loc) for i, loc in zip(idxs, locs, strict=True)
                     if loc is not None and loc.node_id not in excluded]
            if not found:
                break
            self._metrics.read_failovers.inc(len(found))
            log.info("reading %d objects from other replicas (failed on %s)", len(found),
                     ", ".join(sorted(excluded)))
            res = again([i for i, _ in found], [loc for _, loc in found], nodes)
            nbytes += res.nbytes
            tried = {}
            for (i, loc), obj, why in zip(found, res.objects, res.rejected, strict=True):
                objects[i] = obj
                rejected[i] = None if obj is not None else why or rejected[i]
                if obj is None:
                    tried[i] = loc
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    def _each_node(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                   node_list: Sequence[NodeInfo],
                   one_node: Callable[[NodeInfo, list[int]], int]) -> int:
        """`one_node(node, indices)` for every node holding some of the locations, in parallel
        when there are several; the bytes they moved."""
        nodes = {n.node_id: n for n in node_list}
        by_node = _by_node(locations[: len(keys)], nodes)
        jobs = [(nodes[nid], idxs) for nid, idxs in by_node.items()]
        if len(jobs) <= 1:
            return sum(one_node(node, idxs) for node, idxs in jobs)
        futures = [executor().submit(one_node, node, idxs) for node, idxs in jobs]
        return sum(f.result() for f in futures)

    def _each_ssd_node(self, keys: Sequence[str], locations: Sequence[BlockLocation | None],
                       node_list: Sequence[NodeInfo],
                       one_ssd: Callable[[NodeInfo, list[int], SsdReader], int]) -> int:
        """`one_ssd(node, indices, reader)` for every node with SSD replicas among the
        locations (of the registration they were handed out for); the bytes they moved. A node
        that cannot be asked leaves its locations misses."""
        ssd = self._ssd
        nodes = {n.node_id: n for n in node_list}
        by_node = _by_node(locations[: len(keys)], nodes, tier=SSD)
        if ssd is None or not by_node:
            return 0
        moved = 0
        for nid, idxs in by_node.items():
            start = time.perf_counter()
            try:
                moved += one_ssd(nodes[nid], idxs, ssd)
            except TransportError as e:
                log.warning("SSD read from node %s failed: %s", nid, e)
                continue
            self._metrics.read_seconds.labels(ssd.name).observe(time.perf_counter() - start)
        return moved

    def _transfer(self, node: NodeInfo,
                  op: Callable[[Transport], R]) -> tuple[bool, R | None]:
        """(True, what it returned) of `op` over the node's transport, timed; (False, None)
        when there is none or it failed (its locations are misses, and a failed transport is
        let go)."""
        transport = self._transport_for(node)
        if transport is None:
            return False, None
        start = time.perf_counter()
        try:
            out = op(transport)
        except TransportError as e:
            log.warning("read from node %s failed: %s", node.node_id, e)
            self._drop(node, "error")
            return False, None
        self._metrics.read_seconds.labels(transport.name).observe(time.perf_counter() - start)
        return True, out

    def _settle(self, i: int, key: str, got: BlockObject | Rejection,
                objects: list[BlockObject | None], rejected: list[Rejection | None]) -> None:
        if isinstance(got, Rejection):
            log.warning("object read for %s refused: %s", key, got.value)
            self._metrics.rejected.labels(got.value).inc()
            rejected[i] = got
        else:
            objects[i] = got


def _in_dram(locations: Sequence[BlockLocation | None]) -> list[BlockLocation | None]:
    """The locations in DRAM segments; SSD replicas are read by `_each_ssd_node`."""
    return [None if loc is None or loc.tier == SSD else loc for loc in locations]


def _at(locations: Sequence[BlockLocation | None], idxs: list[int]) -> list[BlockLocation]:
    out = [locations[i] for i in idxs]
    assert all(loc is not None for loc in out), "only found locations are planned"
    return out  # type: ignore[return-value]


def _writable(buffer: object, i: int) -> memoryview:
    """`buffers[i]` as a flat byte view, or a CallerBufferError that says what is wrong with it."""
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError as e:
        raise CallerBufferError(f"buffers[{i}] does not export the buffer protocol "
                                f"({type(buffer).__name__})") from e
    if view.readonly:
        raise CallerBufferError(f"buffers[{i}] is read-only")
    if not view.c_contiguous:
        raise CallerBufferError(f"buffers[{i}] is not contiguous")
    return view.cast("B")


def _by_node(locations: Sequence[BlockLocation | None], nodes: dict[str, NodeInfo],
             tier: str | None = None) -> dict[str, list[int]]:
    """The indices of `locations` (of `tier`, when given) per node id, of the nodes in
    `nodes` only: a location is read only from the registration it was handed out for."""
    by_node: dict[str, list[int]] = defaultdict(list)
    for i, loc in enumerate(locations):
        node = None if loc is None else nodes.get(loc.node_id)
        if (loc is not None and node is not None and node.epoch == loc.epoch
                and (tier is None or loc.tier == tier)):
            by_node[loc.node_id].append(i)
    return by_node
