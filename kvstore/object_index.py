"""The master's object records, through its metadata backend, with one index kept beside them:
the objects whose only replica is sealed and in DRAM.

That is nearly every object of a pool without replicas or an SSD tier, and such an object's
reader has no replica to choose: a prefix match over thousands of keys looks each up with one
dict lookup at C speed (`lone_run`) instead of choosing among replicas key by key. The index
holds each such replica already packed (`LONE_FIELDS`, native 64-bit integers), so a run's
locations are one `bytes.join` away from the columns a prefix match answers with, with no
Python object per key on the way. The index is updated by every `put` and `delete` of a
record, so it cannot drift from the records: the master reaches its backend only through this
wrapper.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from kvstore.metadata import (
    DRAM,
    MetadataBackend,
    NodeRecord,
    ObjectState,
    StoredObject,
)

# A lone replica packed: what its ObjectMeta holds besides its key, its node's epoch and what
# every sealed DRAM replica shares (its node as a number: `node_id_of`), in this machine's
# order (an `array("Q")` reads them back as they are: column i is `[i::len(LONE_FIELDS)]`).
LONE_FIELDS = ("offset", "length", "node", "slot_bytes", "token")
LONE_LOCATION = struct.Struct("=" + "Q" * len(LONE_FIELDS))


class IndexedObjects:
    """A `MetadataBackend` (the one it wraps) plus `lone_run`."""

    def __init__(self, backend: MetadataBackend) -> None:
        self.backend = backend
        self._lone: dict[str, bytes] = {}  # key -> LONE_LOCATION of its lone replica
        # Node ids by number and back; a number is never reused (a node id names one node).
        self._node_ids: list[str] = []
        self._numbers: dict[str, int] = {}
        for obj in backend.scan():
            self._index(obj)

    def _index(self, obj: StoredObject) -> None:
        replicas = obj.replicas
        if (len(replicas) == 1 and replicas[0].state is ObjectState.SEALED
                and replicas[0].tier == DRAM):
            r = replicas[0]
            number = self._numbers.get(r.node_id)
            if number is None:
                number = self._numbers[r.node_id] = len(self._node_ids)
                self._node_ids.append(r.node_id)
            self._lone[obj.key] = LONE_LOCATION.pack(r.offset, r.length, number,
                                                     r.slot_bytes, r.token)
        else:
            self._lone.pop(obj.key, None)

    def lone_run(self, keys: Sequence[str]) -> bytes:
        """The LONE_LOCATIONs of the leading run of `keys` whose objects have one replica,
        sealed, in DRAM, concatenated (the run is len() // LONE_LOCATION.size keys long)."""
        found: list[bytes] = []
        try:
            # extend() keeps what it appended before the first miss raised: the run, found
            # with one C-level pass and no per-key check for a miss.
            found.extend(map(self._lone.__getitem__, keys))
        except KeyError:
            pass
        return b"".join(found)

    def node_id_of(self, number: int) -> str:
        return self._node_ids[number]

    # ---- MetadataBackend --------------------------------------------------------------------

    def get(self, key: str) -> StoredObject | None:
        return self.backend.get(key)

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        return self.backend.get_many(keys)

    def put(self, obj: StoredObject) -> None:
        self.backend.put(obj)
        self._index(obj)

    def delete(self, key: str) -> StoredObject | None:
        self._lone.pop(key, None)
        return self.backend.delete(key)

    def scan(self, prefix: str = "") -> Iterator[StoredObject]:
        return self.backend.scan(prefix)

    def count(self) -> int:
        return self.backend.count()

    def put_node(self, record: NodeRecord) -> None:
        self.backend.put_node(record)

    def delete_node(self, node_id: str) -> None:
        self.backend.delete_node(node_id)

    def nodes(self) -> list[NodeRecord]:
        return self.backend.nodes()

    def commit(self) -> None:
        self.backend.commit()

    def close(self) -> None:
        self.backend.close()
