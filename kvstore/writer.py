"""The client's write path: the two-phase put of encoded objects (allocate every replica, write
each, abort the replicas whose write failed, seal the rest of each put together), for a plain
put (`Writer.put_many`) and for a drain's move of an object off a node (`Writer.move`)."""

from __future__ import annotations

import enum
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from kvstore.block_object import (
    BlockLayout,
    BlockObject,
    PendingObject,
    encode_object,
    header_size,
)
from kvstore.config import ClientConfig
from kvstore.errors import KVStoreError, ObjectTooLargeError
from kvstore.limits import check_key
from kvstore.metadata import NodeInfo
from kvstore.reader import DropTransport, TransportFor, executor
from kvstore.transports import TransportError, WriteData, parts_of
from kvstore.wire import grant_from_proto, node_from_proto
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Below this many payload bytes a put's objects are hashed as they are written, in the calling
# thread: handing the hashing to another thread would cost more than it overlaps.
HASH_BEHIND_BYTES = 1 << 20


class PutResult(enum.Enum):
    """How one object of a put (or a move) ended."""

    STORED = "stored"  # written and sealed, or already sealed
    NO_SPACE = "no_space"
    GONE = "gone"  # a move of an object no longer on the node
    BUSY = "busy"  # another put of the key is under way
    FAILED = "failed"  # a write failed or the seal was refused: nothing stored by this put


@dataclass
class _Written:
    """A part of a put once written: its result per key so far, the indexes (into results) of
    the keys written and their tickets, in the same order, to seal, and the tickets of the
    replicas whose write failed, to abort."""

    results: list[PutResult]
    sealing: list[int]
    tickets: list[pb.PutTicket]
    failed: list[pb.PutTicket]


_RESULTS = {pb.PUT_STATE_EXISTS: PutResult.STORED, pb.PUT_STATE_NO_SPACE: PutResult.NO_SPACE,
            pb.PUT_STATE_GONE: PutResult.GONE, pb.PUT_STATE_IN_PROGRESS: PutResult.BUSY}


class Writer:
    """Puts for one client: `master` is its stub, `transport_for(node)` gives the node's
    transport (None: the client holds a newer registration of it), `drop(node, reason)` lets go
    of a transport whose write failed, `saw_membership` hears the master's membership number."""

    def __init__(self, master: pb_grpc.KVMasterStub, config: ClientConfig, host_id: str,
                 transport_for: TransportFor, drop: DropTransport,
                 saw_membership: Callable[[int], None]) -> None:
        self._master = master
        self._config = config
        self._host_id = host_id
        self._transport_for = transport_for
        self._drop = drop
        self._saw_membership = saw_membership

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]],
                 layout: BlockLayout | None, replicas: int | None) -> list[bool]:
        """`KVStoreClient.put_many`: True per item that is now stored."""
        if not items:
            return []
        keys = [k for k, _ in items]
        for i, key in enumerate(keys):
            check_key(key, f"items[{i}]")
        views = [memoryview(d).cast("B") for _, d in items]
        layouts = [layout or BlockLayout.raw(v.nbytes) for v in views]
        sizes = [header_size(k, lay) + v.nbytes
                 for k, lay, v in zip(keys, layouts, views, strict=True)]
        # Larger puts are allocated in two parts: the first batch alone, so its bytes go out
        # while the master allocates the rest.
        behind = len(items) > 1 and sum(v.nbytes for v in views) >= HASH_BEHIND_BYTES
        parts = _allocation_parts(sizes, self._config.batch_bytes if behind else 0)
        self._check_sizes(keys, sizes)  # before any part is allocated
        # The master allocates while the payloads are hashed: the allocation needs only the
        # sizes, and the wait for it is a wait on another process. The second part is asked
        # for once the first is answered (the master allocates one put at a time: asked
        # together, the small first part could wait behind the large second one).
        starts: list[Future[pb.PutStartResponse]] = []
        for a, b in parts:
            starts.append(executor().submit(self._start_after, starts[-1] if starts else None,
                                            keys[a:b], sizes[a:b], replicas or 0))
        try:
            # Header and payload as two parts: the payload is copied only onto the wire or
            # into the segment, never to join them. The headers are built (and checked) now,
            # their checksums filled in below.
            objects = [PendingObject(k, lay, v)
                       for k, lay, v in zip(keys, layouts, views, strict=True)]
        except BaseException:
            for (a, b), start in zip(parts, starts, strict=True):
                self._abandon(keys[a:b], start)
            raise
        assert [o.nbytes for o in objects] == sizes, "header_size is the encoded header's length"
        stop = threading.Event()
        # Each object is hashed once, by the first of: a transport that hashes as it copies
        # (shm), a thread hashing ahead of the transfers (large puts: object i+1 is hashed
        # while object i is on the wire), the transfer that takes its header.
        hashing = (executor().submit(self._hash_ahead, objects, stop, starts[0]) if behind
                   else None)
        written: list[_Written] = []
        done = 0  # parts written (or given up)
        try:
            for (a, b), start in zip(parts, starts, strict=True):
                resp = start.result()
                if a == 0 and resp.max_object_bytes and max(sizes) > resp.max_object_bytes:
                    # The master takes less than this client: refused as a whole, as an
                    # allocation in one part would be, before any part is written.
                    self._abandon(keys[a:b], start)
                    i = next(i for i, n in enumerate(sizes) if n > resp.max_object_bytes)
                    raise ObjectTooLargeError(
                        f"master rejected {keys[i]} as larger than its max_object_bytes "
                        f"{resp.max_object_bytes}")
                written.append(self._write(keys[a:b], objects[a:b], resp))
                done += 1
        except BaseException:
            # The parts after the one that failed were allocated but not written, and those
            # written are not to be sealed: all given back now, not when their grants run out.
            for (a, b), start in zip(parts[done + 1:], starts[done + 1:], strict=True):
                try:
                    self._abandon(keys[a:b], start)
                except grpc.RpcError as e:
                    log.debug("could not give back an allocation: %s", e)
            self._give_back(written)
            raise
        finally:
            # No thread reads the caller's payloads once the put returns.
            stop.set()
            if hashing is not None:
                hashing.result()
        # Every part sealed at once, once all are written: one master call on the put's way
        # out rather than one between its parts, where the stream would wait for it.
        results = self._seal(written)
        # A key named twice is stored once: every item of it is then stored.
        stored = {k for k, r in zip(keys, results, strict=True) if r is PutResult.STORED}
        return [k in stored for k in keys]

    def _hash_ahead(self, objects: Sequence[PendingObject], stop: threading.Event,
                    first: Future[pb.PutStartResponse]) -> None:
        """Hash the objects in the order they are written, once the first part is allocated,
        unless every node it went to is written through a transport that hashes as it copies
        (then hashing ahead would only read every payload once more)."""
        try:
            nodes = [node_from_proto(n) for n in first.result().nodes]
        except BaseException:  # the put fails: it says why, not this thread
            return
        if nodes and all(self._hashes_writes(n) for n in nodes):
            return
        _checksums_in_order(objects, stop)

    def _hashes_writes(self, node: NodeInfo) -> bool:
        transport = self._transport_for(node)
        return transport is not None and bool(getattr(transport, "hashes_writes", False))

    def _abandon(self, keys: Sequence[str], start: Future[pb.PutStartResponse]) -> None:
        """Give back what an allocation under way got, for a put that cannot go on (a layout
        its header cannot hold): its slots return now, not when their grants run out."""
        try:
            resp = start.result()
        except (grpc.RpcError, KVStoreError) as e:
            log.debug("put abandoned before its allocation answered: %s", e)
            return
        tickets = [pb.PutTicket(key=keys[i], token=r.grant.token, node_id=r.location.node_id)
                   for i, slot in enumerate(resp.slots) if slot.state == pb.PUT_STATE_ALLOCATED
                   for r in (list(slot.replicas) or [pb.ReplicaGrant(location=slot.location,
                                                                     grant=slot.grant)])]
        if tickets:
            self._master.PutAbort(pb.PutFinishRequest(puts=tickets),
                                  timeout=self._config.rpc_timeout_s)

    def move(self, objects: Sequence[BlockObject], from_node: str) -> list[PutResult]:
        """`KVStoreClient.move`: each object copied to a node that holds no replica of it."""
        if not objects:
            return []
        keys = [o.key for o in objects]
        encoded = [encode_object(o.key, o.layout, o.payload) for o in objects]
        return self.put(keys, encoded, replace_node=from_node)

    def put(self, keys: Sequence[str], objects: Sequence[WriteData], replicas: int = 0,
            replace_node: str = "") -> list[PutResult]:
        """Two-phase put of encoded objects: allocate every replica, write each, abort the
        replicas whose write failed, seal the rest of each put together."""
        sizes = [sum(p.nbytes for p in parts_of(o)) for o in objects]
        resp = self._start(keys, sizes, replicas, replace_node)
        return self._write_and_seal(keys, objects, resp)

    def _start(self, keys: Sequence[str], sizes: Sequence[int], replicas: int,
               replace_node: str) -> pb.PutStartResponse:
        """The master's allocation of every replica of objects of `sizes` (refused at once
        when one is larger than this client's max_object_bytes)."""
        self._check_sizes(keys, sizes)
        resp: pb.PutStartResponse = self._master.PutStart(
            pb.PutStartRequest(keys=keys, sizes=sizes, client_host_id=self._host_id,
                               replicas=replicas, replace_node=replace_node),
            timeout=self._config.rpc_timeout_s)
        self._saw_membership(resp.membership)
        return resp

    def _start_after(self, before: Future[pb.PutStartResponse] | None, keys: Sequence[str],
                     sizes: Sequence[int], replicas: int) -> pb.PutStartResponse:
        """`_start` of a put's part once the allocation of the part `before` it has ended
        (a job the executor took earlier, so this wait cannot deadlock)."""
        if before is not None:
            before.exception()  # its outcome is the caller's to see; only its end matters
        return self._start(keys, sizes, replicas, "")

    def _check_sizes(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        limit = self._config.max_object_bytes
        for key, size in zip(keys, sizes, strict=True):
            if size > limit:
                raise ObjectTooLargeError(
                    f"object {key} is {size} bytes; max_object_bytes is {limit}")

    def _write_and_seal(self, keys: Sequence[str], objects: Sequence[WriteData],
                        resp: pb.PutStartResponse) -> list[PutResult]:
        """Write each allocated replica, abort those whose write failed, seal the rest."""
        return self._seal([self._write(keys, objects, resp)])

    def _write(self, keys: Sequence[str], objects: Sequence[WriteData],
               resp: pb.PutStartResponse) -> _Written:
        """Write each allocated replica; what is left to seal and to abort (`_seal`)."""
        nodes = {n.node_id: node_from_proto(n) for n in resp.nodes}
        results = [PutResult.FAILED] * len(keys)
        # Per node, the (item, replica) writes it gets.
        by_node: dict[str, list[tuple[int, pb.ReplicaGrant]]] = defaultdict(list)
        too_large: list[str] = []
        for i, slot in enumerate(resp.slots):
            if slot.state == pb.PUT_STATE_ALLOCATED:
                reps = list(slot.replicas) or [pb.ReplicaGrant(location=slot.location,
                                                               grant=slot.grant)]
                for r in reps:
                    by_node[r.location.node_id].append((i, r))
                if len(reps) < slot.wanted:
                    log.debug("%s: %d of %d replicas (the pool has fewer nodes with room)",
                              keys[i], len(reps), slot.wanted)
            elif slot.state == pb.PUT_STATE_TOO_LARGE:
                too_large.append(keys[i])
            else:
                results[i] = _RESULTS.get(slot.state, PutResult.FAILED)
        written: set[int] = set()
        failed: list[pb.PutTicket] = []
        for node_id, reps in by_node.items():
            transport = None if too_large or node_id not in nodes else self._transport_for(
                nodes[node_id])
            if transport is not None:
                ops = [(grant_from_proto(r.grant), objects[i]) for i, r in reps]
                try:
                    transport.write(ops)
                    written.update(i for i, _ in reps)
                    continue
                except TransportError as e:
                    log.warning("write to node %s failed: %s", node_id, e)
                    self._drop(nodes[node_id], "error")
            # Only this node's replicas are given up: the put lives on in the others.
            failed.extend(pb.PutTicket(key=keys[i], token=r.grant.token, node_id=node_id)
                          for i, r in reps)
        if too_large:
            # Nothing was written: the allocations are given back before the put fails.
            if failed:
                self._master.PutAbort(pb.PutFinishRequest(puts=failed),
                                      timeout=self._config.rpc_timeout_s)
            raise ObjectTooLargeError(
                f"master rejected {too_large[0]} as larger than its max_object_bytes "
                f"{resp.max_object_bytes}")
        order = sorted(written)
        return _Written(results, order, [pb.PutTicket(key=keys[i],
                                                      token=resp.slots[i].grant.token)
                                         for i in order], failed)

    def _seal(self, parts: Sequence[_Written]) -> list[PutResult]:
        """Abort the replicas of `parts` whose write failed and seal the objects written, each
        with one master call for every part; the result per key of the parts, in order."""
        timeout = self._config.rpc_timeout_s
        failed = [t for p in parts for t in p.failed]
        if failed:
            self._master.PutAbort(pb.PutFinishRequest(puts=failed), timeout=timeout)
        tickets = [t for p in parts for t in p.tickets]
        if tickets:
            sealed = self._master.PutEnd(pb.PutFinishRequest(puts=tickets),
                                         timeout=timeout).sealed
            assert len(sealed) == len(tickets), "one answer per ticket"
            at = 0
            for p in parts:
                for i, ok in zip(p.sealing, sealed[at : at + len(p.sealing)], strict=True):
                    if ok:
                        p.results[i] = PutResult.STORED
                at += len(p.sealing)
        return [r for p in parts for r in p.results]

    def _give_back(self, parts: Sequence[_Written]) -> None:
        """Abort every replica of `parts`, written or not (a put that fails after writing
        them), so their slots return now; best effort."""
        tickets = [t for p in parts for t in p.failed]
        for p in parts:
            tickets += [pb.PutTicket(key=t.key, token=t.token) for t in p.tickets]
        if tickets:
            try:
                self._master.PutAbort(pb.PutFinishRequest(puts=tickets),
                                      timeout=self._config.rpc_timeout_s)
            except grpc.RpcError as e:
                log.debug("could not give back written parts: %s", e)


def _allocation_parts(sizes: Sequence[int], first_bytes: int) -> list[tuple[int, int]]:
    """[start, end) of the parts a put is allocated in: with `first_bytes`, the leading
    objects that fit in it (at least one) and then the rest; else the whole put at once."""
    n = len(sizes)
    first, total = 0, 0
    while first_bytes and first < n and (first == 0 or total + sizes[first] <= first_bytes):
        total += sizes[first]
        first += 1
    return [(0, first), (first, n)] if 0 < first < n else [(0, n)]


def _checksums_in_order(objects: Sequence[PendingObject], stop: threading.Event) -> None:
    """Each object's checksum in turn, the order they are written in; once `stop` is set
    (the put is over) the rest are given up."""
    for o in objects:
        if stop.is_set():
            o.give_up()
        else:
            o.compute_checksum()
