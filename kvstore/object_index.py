"""The master's object records, through its metadata backend, with one index kept beside them:
the objects whose only replica is sealed and in DRAM.

That is nearly every object of a pool without replicas or an SSD tier, and such an object's
reader has no replica to choose: a prefix match over thousands of keys looks each up with one
dict lookup at C speed (`lone_many`) instead of choosing among replicas key by key. The index
is updated by every `put` and `delete` of a record, so it cannot drift from the records: the
master reaches its backend only through this wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvstore.metadata import (
    DRAM,
    MetadataBackend,
    NodeRecord,
    ObjectMeta,
    ObjectState,
    StoredObject,
)


class IndexedObjects:
    """A `MetadataBackend` (the one it wraps) plus `lone_many`."""

    def __init__(self, backend: MetadataBackend) -> None:
        self.backend = backend
        self._lone: dict[str, ObjectMeta] = {}
        for obj in backend.scan():
            self._index(obj)

    def _index(self, obj: StoredObject) -> None:
        replicas = obj.replicas
        if (len(replicas) == 1 and replicas[0].state is ObjectState.SEALED
                and replicas[0].tier == DRAM):
            self._lone[obj.key] = replicas[0]
        else:
            self._lone.pop(obj.key, None)

    def lone_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """Per key, the object's replica when it is its only one, sealed, in DRAM; else None
        (no such object, or one with replicas to choose from or none sealed)."""
        return list(map(self._lone.get, keys))

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
