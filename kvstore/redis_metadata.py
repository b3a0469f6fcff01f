"""Pool metadata in a redis-server (redis-py): objects, nodes and put states outlive the master.

The master is the only writer, so the backend keeps a write-through copy of every record and
answers reads from it; what changed is buffered and written by `commit` in one Lua script (atomic
in redis-server), once per master operation, under the master's lock (so Redis sees operations
in the master's order).

Fencing: with standby masters, the master's lock orders its own writes but not those of a master
that lost the leader lease while one of its operations was under way (paused past the lease
margin, say). So a fenced backend's script first checks that the lease key still holds this
master's value and writes nothing when it does not: the commit raises NotLeaderError, the
backend is deposed for good, and the master steps down.

Layout, in the URL's database:
    pantry:kv:objects  hash  key     -> JSON [[node_id, offset, length, slot, state, epoch,
                                               token, tier], ...]: one list per replica
                                        (a record of one flat replica list, written before
                                        replicas existed, still loads)
    pantry:kv:nodes    hash  node_id -> JSON NodeInfo fields + the epoch's grant key (hex)

When a commit fails (redis-server down or restarting), the master keeps serving from its copy;
the next commit, at most once a second, rewrites both hashes whole from the copy, so a Redis
that came back empty (no persistence) or missed changes ends up exactly as the master sees it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, cast

import redis

from kvstore.errors import MetadataUnavailableError, NotLeaderError
from kvstore.metadata import DRAM, NodeInfo, NodeRecord, ObjectMeta, ObjectState, StoredObject

log = logging.getLogger(__name__)

OBJECTS = "pantry:kv:objects"
NODES = "pantry:kv:nodes"
_RETRY_S = 1.0
# Stands for the lease key when the backend is unfenced (never read: the value is empty).
_NO_FENCE = "pantry:kv:unfenced"

# One commit, atomic in redis-server. KEYS: lease key, objects hash, nodes hash. ARGV: the value
# the lease key must hold ('' = unfenced), '1' to rewrite both hashes whole, then the counts of
# object sets, object deletes, node sets, node deletes, then those fields (a set: key, value).
# Returns 0, having written nothing, when the lease is not (or no longer) the fence's holder:
# a leader paused past its lease cannot land one stale write after a new leader took over.
_COMMIT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[2], KEYS[3])
end
local i = 7
local function apply(hash, nset, ndel)
  for _ = 1, nset do
    redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  for _ = 1, ndel do
    redis.call('HDEL', hash, ARGV[i])
    i = i + 1
  end
end
apply(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
apply(KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
"""


def _encode_object(obj: StoredObject) -> str:
    # The put deadline is on the master's monotonic clock: meaningless to another process, and
    # a recovering master reclaims every pending put anyway.
    return json.dumps([[m.node_id, m.offset, m.length, m.slot_bytes, m.state.value, m.epoch,
                        m.token, m.tier] for m in obj.replicas])


def _decode_replica(key: str, fields: list[Any]) -> ObjectMeta:
    node_id, offset, length, slot, state, epoch, token, *rest = fields
    tier = rest[0] if rest else DRAM
    return ObjectMeta(key, node_id, offset, length, slot, ObjectState(state), 0.0, epoch, token,
                      tier)


def _decode_object(key: str, raw: str) -> StoredObject:
    fields = json.loads(raw)
    replicas = [fields] if isinstance(fields[0], str) else fields
    return StoredObject(key, tuple(_decode_replica(key, r) for r in replicas))


def _encode_node(r: NodeRecord) -> str:
    return json.dumps({**asdict(r.info), "grant_key": r.grant_key.hex(),
                       "draining": r.draining})


def _decode_node(raw: str) -> NodeRecord:
    fields = json.loads(raw)
    key = bytes.fromhex(fields.pop("grant_key"))
    draining = bool(fields.pop("draining", False))
    return NodeRecord(NodeInfo(**fields), key, draining)


class RedisBackend:
    def __init__(self, url: str, timeout_s: float = 2.0,
                 fence: tuple[str, str] | None = None) -> None:
        """`fence`: (lease key, this master's value in it): every commit is applied only while
        the key holds that value. None: unfenced (a master that is the only writer)."""
        self.url = url
        self._fence = fence
        self.deposed = False
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
        self._dirty_objects: dict[str, StoredObject | None] = {}
        self._dirty_nodes: dict[str, NodeRecord | None] = {}
        self._resync = False
        self._next_try = 0.0
        self.commits = self.failed_commits = self.refused_commits = 0
        self._commit_script = self._redis.register_script(_COMMIT)
        log.info("metadata in %s: %d objects, %d nodes", url, len(self._objects),
                 len(self._nodes))

    # ---- objects ----------------------------------------------------------------------------

    def get(self, key: str) -> StoredObject | None:
        return self._objects.get(key)

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        return list(map(self._objects.get, keys))

    def put(self, obj: StoredObject) -> None:
        self._objects[obj.key] = obj
        self._dirty_objects[obj.key] = obj

    def delete(self, key: str) -> StoredObject | None:
        obj = self._objects.pop(key, None)
        if obj is not None:
            self._dirty_objects[key] = None
        return obj

    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
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
        """Write what changed since the last commit, in one atomic script; with a fence, only
        while the lease key still holds this master's value (NotLeaderError otherwise: nothing
        of it was written, and no later commit of this backend is ever tried)."""
        if self.in_sync:
            return
        if self.deposed:
            raise NotLeaderError(f"metadata store {self.url}: this master was deposed; "
                                 "its changes are not written")
        if self._resync and time.monotonic() < self._next_try:
            return
        if self._resync:
            sets = ({k: _encode_object(m) for k, m in self._objects.items()},
                    {k: _encode_node(r) for k, r in self._nodes.items()})
            dels: tuple[list[str], list[str]] = ([], [])
        else:
            sets = ({k: _encode_object(m) for k, m in self._dirty_objects.items()
                     if m is not None},
                    {k: _encode_node(r) for k, r in self._dirty_nodes.items() if r is not None})
            dels = ([k for k, m in self._dirty_objects.items() if m is None],
                    [k for k, r in self._dirty_nodes.items() if r is None])
        fence_key, fence_value = self._fence or (_NO_FENCE, "")
        args: list[str] = [fence_value, "1" if self._resync else "0",
                           *(str(n) for n in (len(sets[0]), len(dels[0]),
                                              len(sets[1]), len(dels[1])))]
        for mapping, gone in zip(sets, dels, strict=True):
            for k, v in mapping.items():
                args += (k, v)
            args += gone
        try:
            applied = self._commit_script(keys=[fence_key, OBJECTS, NODES], args=args)
        except redis.RedisError as e:
            if not self._resync:
                log.warning("metadata store %s unreachable (%s); serving from memory and "
                            "rewriting it whole once it answers", self.url, e)
            self._resync = True
            self._next_try = time.monotonic() + _RETRY_S
            self.failed_commits += 1
            return
        if not applied:
            self.depose()
            self.refused_commits += 1
            raise NotLeaderError(f"metadata store {self.url}: the leader lease {fence_key} is "
                                 "no longer this master's; its changes are not written")
        if self._resync:
            log.info("metadata store %s rewritten from the master's records", self.url)
        self._resync = False
        self._dirty_objects.clear()
        self._dirty_nodes.clear()
        self.commits += 1

    def depose(self) -> None:
        """This master lost the lease: its copy is stale from now on and is never written (a
        new leader, this process again included, loads a fresh backend from Redis)."""
        self.deposed = True

    def close(self) -> None:
        try:
            self.commit()
        except NotLeaderError as e:
            log.warning("%s", e)
        finally:
            self._redis.close()
