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

Reads are planned from columns (`kvstore.placement.Placement`): a prefix match's offsets and
lengths become each node's transport ops with no object per location, and only the keys that
fail over are looked at one by one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
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
from kvstore.metadata import DRAM, SSD, BlockLocation, NodeInfo
from kvstore.metrics import ClientMetrics
from kvstore.placement import Placement
from kvstore.transports import ReadInto, Transport, TransportError
from kvstore.transports.ssd import SsdReader

log = logging.getLogger(__name__)

# Threads that read from different nodes at once (one node's reads stay on one thread, in
# order, over one connection).
READ_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


# A node's read at least this large has its objects checked on `checker()` threads as they
# land, while the next ones arrive; below it, one by one after the transfer (a thread's
# hand-off would cost more than the checks).
OVERLAP_CHECK_BYTES = 1 << 20
_checker: ThreadPoolExecutor | None = None


def checker() -> ThreadPoolExecutor:
    """Threads that check objects as they land (apart from `executor()`, whose threads wait
    for these checks). xxh3 releases the GIL, so a check runs beside the next receive."""
    global _checker
    with _pool_lock:
        if _checker is None:
            _checker = ThreadPoolExecutor(2, thread_name_prefix="kv-check")
        return _checker


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
T = TypeVar("T")
TransportFor = Callable[[NodeInfo], "Transport | None"]
DropTransport = Callable[[NodeInfo, str], None]
# (keys, node ids to avoid) -> a location per key on another node (None: no other replica) and
# the nodes they are on: the master's GetReplicas with exclude_nodes.
Relocate = Callable[[Sequence[str], Collection[str]],
                    tuple[list[BlockLocation | None], list[NodeInfo]]]
# Read again the keys at these indices, from these places (one per index, in order).
ReadAgain = Callable[[list[int], Placement], Fetched]


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

    def read(self, where: Placement, layout: BlockLayout | None) -> Fetched:
        """The object per key of `where`, checked (`layout`: any when None); a key whose
        location fails is read from another replica."""
        def again(idxs: list[int], other: Placement) -> Fetched:
            return self._read_once(other, layout)

        return self._fail_over(where, self._read_once(where, layout), again)

    def _read_once(self, where: Placement, layout: BlockLayout | None) -> Fetched:
        keys, n = where.keys, len(where.keys)
        objects: list[BlockObject | None] = [None] * n
        rejected: list[Rejection | None] = [None] * n

        def one_node(node: NodeInfo, idxs: list[int]) -> int:
            ops = list(zip(_at(where.offsets, idxs), _at(where.lengths, idxs), strict=True))
            done, data = self._transfer(node, lambda t: t.read(ops))
            if not done:
                return 0
            assert data is not None
            for i, d in zip(idxs, data, strict=True):
                self._settle(i, keys[i], check_object(d, keys[i], layout), objects, rejected)
            return sum(len(d) for d in data)

        def one_ssd(node: NodeInfo, idxs: list[int], ssd: SsdReader) -> int:
            data = ssd.read(node, _at(keys, idxs), _at(where.lengths, idxs))
            for i, d in zip(idxs, data, strict=True):
                self._settle(i, keys[i], check_object(d, keys[i], layout), objects, rejected)
            return sum(len(d) for d in data)

        nbytes = self._each_ssd_node(where, n, one_ssd)
        nbytes += self._each_node(where, n, one_node)
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    def read_into(self, where: Placement, buffers: Sequence[object],
                  layout: BlockLayout | None) -> Fetched:
        """Each object's payload straight into `buffers[i]` (the first len(buffers) keys of
        `where`); see `KVStoreClient.read_into`. A key whose location fails is read from
        another replica, into the same buffer."""
        def again(idxs: list[int], other: Placement) -> Fetched:
            return self._read_into_once(other, _at(buffers, idxs), layout)

        got = self._read_into_once(where, buffers, layout)
        return self._fail_over(where, got, again)

    def _read_into_once(self, where: Placement, buffers: Sequence[object],
                        layout: BlockLayout | None) -> Fetched:
        keys = where.keys
        if len(buffers) > len(keys):
            raise CallerBufferError(f"{len(buffers)} buffers for {len(keys)} objects")
        n = len(buffers)
        views = [_writable(b, i) for i, b in enumerate(buffers)]
        sizes = [v.nbytes for v in views]
        heads = _header_sizes(keys, sizes, layout)
        _check_fit(where, heads, sizes)
        objects: list[BlockObject | None] = [None] * n
        rejected: list[Rejection | None] = [None] * n

        def check(i: int, head: memoryview, digest: int | None = None) -> None:
            got = check_parts(head, views[i], keys[i], layout or BlockLayout.raw(sizes[i]),
                              digest=digest)
            self._settle(i, keys[i], got, objects, rejected)

        def one_node(node: NodeInfo, idxs: list[int]) -> int:
            # The headers land aside, in one scratch cut to their exact sizes; each payload
            # lands where the caller wants it, so the copy out of the node is the only one.
            scratch = _scratch(_at(heads, idxs))
            parts = zip(scratch, _at(views, idxs), strict=True)
            ops: list[ReadInto] = list(zip(_at(where.offsets, idxs), parts, strict=True))
            moved = sum(_at(where.lengths, idxs))
            checks: list[Future[None]] = []

            def landed(j: int) -> None:
                checks.append(checker().submit(check, idxs[j], scratch[j]))

            overlap = moved >= OVERLAP_CHECK_BYTES
            ok, digests = self._transfer(
                node, lambda t: t.read_into(ops, landed if overlap else None))
            for f in checks:  # objects that landed whole stand even if the transfer then failed
                f.result()
            if not ok:
                return 0
            if digests is not None:  # hashed as they were copied: the headers are left
                assert len(digests) == len(idxs), "a hashing transport digests every op"
                for i, head, digest in zip(idxs, scratch, digests, strict=True):
                    check(i, head, digest)
            elif overlap:
                assert len(checks) == len(idxs), "a transport tells of every op it filled"
            else:
                for i, head in zip(idxs, scratch, strict=True):
                    check(i, head)
            return moved

        def one_ssd(node: NodeInfo, idxs: list[int], ssd: SsdReader) -> int:
            # The node's objects in one call (one request when they come over tcp).
            scratch = _scratch(_at(heads, idxs))
            checked: dict[int, Future[None]] = {}

            def landed(j: int) -> None:
                checked[j] = checker().submit(check, idxs[j], scratch[j])

            overlap = sum(_at(sizes, idxs)) >= OVERLAP_CHECK_BYTES
            try:
                got = ssd.read_many_into(node, [(keys[i], [head, views[i]]) for i, head
                                                in zip(idxs, scratch, strict=True)],
                                         landed if overlap else None)
            finally:
                for f in checked.values():
                    f.result()
            moved = 0
            for j, (i, head, ok) in enumerate(zip(idxs, scratch, got, strict=True)):
                if ok:
                    if j not in checked:
                        check(i, head)
                    moved += heads[i] + sizes[i]
            return moved

        nbytes = self._each_ssd_node(where, n, one_ssd)
        nbytes += self._each_node(where, n, one_node)
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    # ---- shared -----------------------------------------------------------------------------

    def _fail_over(self, where: Placement, got: Fetched, again: ReadAgain) -> Fetched:
        """`got`, with each key that had a location but was not read (node unreachable, not
        the registration the location names, bytes refused) read again from a replica on a
        node not tried yet, for as long as the master hands one. A key read in the end has no
        rejection; one never read keeps its last. Only the keys that failed are looked at
        one by one."""
        if self._relocate is None or all(o is not None for o in got.objects):
            return got
        objects, rejected, nbytes = list(got.objects), list(got.rejected), got.nbytes
        tried = {i: where.node_id(i) for i, obj in enumerate(objects)
                 if obj is None and where.located(i)}
        excluded: set[str] = set()
        # Each round excludes at least one more node: at most one round per other replica.
        for _ in range(MAX_REPLICAS - 1):
            if not tried:
                break
            excluded.update(tried.values())
            idxs = list(tried)
            locs, nodes = self._relocate([where.keys[i] for i in idxs], excluded)
            found = [(i, loc) for i, loc in zip(idxs, locs, strict=True)
                     if loc is not None and loc.node_id not in excluded]
            if not found:
                break
            self._metrics.read_failovers.inc(len(found))
            log.info("reading %d objects from other replicas (failed on %s)", len(found),
                     ", ".join(sorted(excluded)))
            res = again([i for i, _ in found], Placement.of_locations(
                [where.keys[i] for i, _ in found], [loc for _, loc in found], nodes))
            nbytes += res.nbytes
            tried = {}
            for (i, loc), obj, why in zip(found, res.objects, res.rejected, strict=True):
                objects[i] = obj
                rejected[i] = None if obj is not None else why or rejected[i]
                if obj is None:
                    tried[i] = loc.node_id
        return Fetched(tuple(objects), tuple(rejected), nbytes)

    def _each_node(self, where: Placement, n: int,
                   one_node: Callable[[NodeInfo, list[int]], int]) -> int:
        """`one_node(node, indices)` for every node holding some of the first `n` locations
        in DRAM, in parallel when there are several; the bytes they moved."""
        jobs = where.by_node(DRAM, n)
        if len(jobs) <= 1:
            return sum(one_node(node, idxs) for node, idxs in jobs)
        futures = [executor().submit(one_node, node, idxs) for node, idxs in jobs]
        return sum(f.result() for f in futures)

    def _each_ssd_node(self, where: Placement, n: int,
                       one_ssd: Callable[[NodeInfo, list[int], SsdReader], int]) -> int:
        """`one_ssd(node, indices, reader)` for every node with SSD replicas among the first
        `n` locations (of the registration they were handed out for); the bytes they moved.
        A node that cannot be asked leaves its locations misses."""
        ssd = self._ssd
        if ssd is None or not where.tiers:  # no tier column: every location is in DRAM
            return 0
        moved = 0
        for node, idxs in where.by_node(SSD, n):
            start = time.perf_counter()
            try:
                moved += one_ssd(node, idxs, ssd)
            except TransportError as e:
                log.warning("SSD read from node %s failed: %s", node.node_id, e)
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


def _at(column: Sequence[T], idxs: list[int]) -> list[T]:
    return [column[i] for i in idxs]


def _header_sizes(keys: Sequence[str], sizes: list[int],
                  layout: BlockLayout | None) -> list[int]:
    """The header's size of each object to read into a buffer of `sizes[i]` bytes. It
    depends on the key's length only, given the layout (plain bytes, of any size, when None;
    keys are ASCII): computed once per length, not once per key."""
    by_len: dict[int, int] = {}
    out = []
    for key, size in zip(keys, sizes, strict=False):
        head = by_len.get(len(key))
        if head is None:
            head = by_len[len(key)] = header_size(key, layout or BlockLayout.raw(size))
        out.append(head)
    return out


def _check_fit(where: Placement, heads: list[int], sizes: list[int]) -> None:
    """CallerBufferError unless each buffer is exactly the payload its location holds."""
    lengths = where.lengths
    for i, (head, size) in enumerate(zip(heads, sizes, strict=True)):
        if lengths[i] != head + size and where.located(i):
            raise CallerBufferError(
                f"buffers[{i}] is {size} bytes; the object of {where.keys[i]} holds "
                f"{lengths[i] - head} bytes of payload ({lengths[i]} with its {head}-byte "
                f"header): pass a buffer of exactly the payload's size")


def _scratch(heads: list[int]) -> list[memoryview]:
    """A view per header of one allocation, each of its header's size."""
    whole = memoryview(bytearray(sum(heads)))
    return [whole[end - head : end] for end, head in zip(accumulate(heads), heads, strict=True)]


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
