"""`kvstore drain NODE`: empty a node while readers go on.

The master stays off the data path, so the client that runs the drain moves the bytes. The
master marks the node draining (nothing new is placed on it) and lists its sealed keys; for each
batch this driver reads the objects through the ordinary checked read path (from any replica),
then puts each with a replace put: a new replica on a node that holds none, which the master
swaps in for the draining node's replica in one step when it is sealed. The old slot stays
allocated until the last reader's lease on it runs out, so a read in flight never sees it
reused. An object no other node has room for is dropped from the node (a miss for readers once
it has no other replica, which the engines recompute).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.client import KVStoreClient, PutResult
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

# A key whose read or write fails this many times is dropped from the node rather than retried
# for ever (its bytes are unreadable or no node takes them).
MAX_TRIES = 3


class DrainTimeoutError(KVStoreError):
    """The node still held objects (puts under way, or busy keys) when the drain gave up."""


@dataclass(frozen=True)
class DrainReport:
    node_id: str
    moved: int  # replicas copied to another node and swapped in
    dropped: int  # replicas given up: no room elsewhere, or unreadable
    seconds: float


def drain_node(client: KVStoreClient, node_id: str, batch: int = 256, timeout_s: float = 120.0,
               progress: Callable[[int, int, int], None] | None = None) -> DrainReport:
    """Move every object off `node_id` (see the module). `progress(moved, dropped, left)` after
    each batch. Raises DrainTimeoutError when objects remain after `timeout_s` (the node stays
    draining; running the drain again continues it)."""
    start = time.monotonic()
    deadline = start + timeout_s
    moved = dropped = 0
    drop: list[str] = []
    tries: dict[str, int] = {}
    while True:
        state = client.drain(node_id, limit=batch, drop=drop)
        dropped += state.dropped
        drop = []
        if progress is not None:
            progress(moved, dropped, state.replicas)
        if state.replicas == 0:
            break
        if time.monotonic() > deadline:
            raise DrainTimeoutError(
                f"node {node_id} still holds {state.replicas} objects after {timeout_s:.0f} s "
                "(puts under way?); run the drain again to go on")
        if not state.keys:
            # Only puts under way (started before the drain) or moves being sealed: they end
            # sealed (then listed) or reclaimed within the master's put timeout.
            time.sleep(0.05)
            continue
        fetched = client.get_objects(list(state.keys))
        readable = [o for o in fetched.objects if o is not None]
        for key, obj in zip(state.keys, fetched.objects, strict=True):
            if obj is None:
                _failed(key, tries, drop)
        for obj, result in zip(readable, client.move(readable, node_id), strict=True):
            if result is PutResult.STORED:
                moved += 1
            elif result is PutResult.NO_SPACE:
                drop.append(obj.key)
            elif result is PutResult.FAILED:
                _failed(obj.key, tries, drop)
            # GONE: evicted or removed meanwhile; BUSY: listed again once its put ends.
    seconds = time.monotonic() - start
    log.info("node %s drained in %.2f s: %d moved, %d dropped", node_id, seconds, moved,
             dropped)
    return DrainReport(node_id, moved, dropped, seconds)


def _failed(key: str, tries: dict[str, int], drop: list[str]) -> None:
    tries[key] = tries.get(key, 0) + 1
    if tries[key] >= MAX_TRIES:
        log.warning("%s: unreadable or unwritable %d times; dropping it from the node", key,
                    tries[key])
        drop.append(key)
