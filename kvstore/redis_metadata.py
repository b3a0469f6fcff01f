"""Pool metadata in a redis-server (redis-py): objects, nodes and put states outlive the master.

The master is the only writer, so the backend keeps a write-through copy of every record and
answers reads from it; what changed is buffered and written by `commit` in one MULTI/EXEC, once
per master operation, under the master's lock (so Redis sees operations in the master's order).

Layout, in the URL's database:
    pantry:kv:objects  hash  key     -> JSON [node_id, offset, length, slot, state, epoch, token]
    pantry:kv:nodes    hash  node_id -> JSON NodeInfo fields + the epoch's grant key (hex)

When a commit fails (redis-server down or restarting), the master keeps serving from its copy;
the next commit, at most once a second, rewrites both hashes whole from the copy, so a Redis
that came back empty (no persistence) or missed changes ends up exactly as the master sees it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, cast

import redis

from kvstore.errors import MetadataUnavailableError
from kvstore.metadata import NodeInfo, NodeRecord, ObjectMeta, ObjectState

log = logging.getLogger(__name__)

OBJECTS = "pantry:kv:objects"
NODES = "pantry:kv:nodes"
_RETRY_S = 1.0


def _encode_object(m: ObjectMeta) -> str:
    # The put deadline is on the master's monotonic clock: meaningless to another process, and
    # a recovering master reclaims every pending put anyway.
    return json.dumps([m.node_id, m.offset, m.length, m.slot_bytes, m.state.value, m.epoch,
                       m.token])


def _decode_object(key: str, raw: str) -> ObjectMeta:
    node_id, offset, length, slot, state, epoch, token = json.loads(raw)
    return ObjectMeta(key, node_id, offset, length, slot, ObjectState(state), 0.0, epoch, token)


def _encode_node(r: NodeRecord) -> str:
    return json.dumps({**asdict(r.info), "grant_key": r.grant_key.hex()})


def _decode_node(raw: str) -> NodeRecord:
    fields = json.loads(raw)
    key = bytes.fromhex(fields.pop("grant_key"))
    return NodeRecord(NodeInfo(**fields), key)


class RedisBackend:
    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url = url
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        try:
            # decode_responses=True: str in, str out (redis-py's stubs cannot say so).
            objects = cast(dict[str, str], self._redis.hgetall(OBJECTS))
            nodes = cast(dict[str, str], self._redis.hgetall(NODES))
        except redis.RedisError as e:
            self._redis.close()
            raise MetadataUnavailableError(f"metadata store {url}: {e}") from e
        self._objects = {k: _decode_object(k, v) for k, v in objects.items()}
        self._nodes = {k: _decode_node(v) for k, v in nodes.items()}
        # Changed since the last commit: the record to write, or None to delete.
        self._dirty_objects: dict[str, ObjectMeta | None] = {}
        self._dirty_nodes: dict[str, NodeRecord | None] = {}
        self._resync = False
        self._next_try = 0.0
        self.commits = self.failed_commits = 0
        log.info("metadata in %s: %d objects, %d nodes", url, len(self._objects),
                 len(self._nodes))

    # ---- objects ----------------------------------------------------------------------------

    def get(self, key: str) -> ObjectMeta | None:
        return self._objects.get(key)

    def put(self, meta: ObjectMeta) -> None:
        self._objects[meta.key] = meta
        self._dirty_objects[meta.key] = meta

    def delete(self, key: str) -> ObjectMeta | None:
        meta = self._objects.pop(key, None)
        if meta is not None:
            self._dirty_objects[key] = None
        return meta

    def scan(self, prefix: str = "") -> Iterator[ObjectMeta]:
        for key in sorted(k for k in self._objects if k.startswith(prefix)):
            yield self._objects[key]

    def count(self) -> int:
        return len(self._objects)

    # ---- nodes ------------------------------------------------------------------------------

    def put_node(self, record: NodeRecord) -> None:
        self._nodes[record.info.node_id] = record
        self._dirty_nodes[record.info.node_id] = record

    def delete_node(self, node_id: str) -> None:
        if self._nodes.pop(node_id, None) is not None:
            self._dirty_nodes[node_id] = None

    def nodes(self) -> list[NodeRecord]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    # ---- durability -------------------------------------------------------------------------

    @property
    def in_sync(self) -> bool:
        """Whether Redis holds exactly what the master sees (nothing waiting to be written)."""
        return not (self._resync or self._dirty_objects or self._dirty_nodes)

    def commit(self) -> None:
        if self.in_sync:
            return
        if self._resync and time.monotonic() < self._next_try:
            return
        pipe = self._redis.pipeline(transaction=True)
        if self._resync:
            pipe.delete(OBJECTS, NODES)
            self._write(pipe, OBJECTS, {k: _encode_object(m) for k, m in self._objects.items()})
            self._write(pipe, NODES, {k: _encode_node(r) for k, r in self._nodes.items()})
        else:
            self._apply(pipe, OBJECTS, {k: None if m is None else _encode_object(m)
                                        for k, m in self._dirty_objects.items()})
            self._apply(pipe, NODES, {k: None if r is None else _encode_node(r)
                                      for k, r in self._dirty_nodes.items()})
        try:
            pipe.execute()
        except redis.RedisError as e:
            if not self._resync:
                log.warning("metadata store %s unreachable (%s); serving from memory and "
                            "rewriting it whole once it answers", self.url, e)
            self._resync = True
            self._next_try = time.monotonic() + _RETRY_S
            self.failed_commits += 1
            return
        finally:
            pipe.reset()
        if self._resync:
            log.info("metadata store %s rewritten from the master's records", self.url)
        self._resync = False
        self._dirty_objects.clear()
        self._dirty_nodes.clear()
        self.commits += 1

    @staticmethod
    def _write(pipe: redis.client.Pipeline, name: str, mapping: dict[str, str]) -> None:
        if mapping:
            pipe.hset(name, mapping=cast(Any, mapping))

    @staticmethod
    def _apply(pipe: redis.client.Pipeline, name: str, changes: dict[str, str | None]) -> None:
        RedisBackend._write(pipe, name, {k: v for k, v in changes.items() if v is not None})
        gone = [k for k, v in changes.items() if v is None]
        if gone:
            pipe.hdel(name, *gone)

    def close(self) -> None:
        self.commit()
        self._redis.close()
