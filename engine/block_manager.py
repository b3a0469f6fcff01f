"""KV cache block ids and the engine-local prefix cache over them.

Modelled on vLLM v1's block pool: every block has a reference count; a block whose count drops
to zero goes to the tail of the free queue but keeps its block key, so a later sequence with the
same prefix takes it back (`touch`) instead of pulling or computing it. New blocks come from the
head of the queue, so the least recently freed cached block is evicted first. A sequence frees
its blocks last-to-first (`free(reversed(ids))`), so its prefix outlives its tail.

The pool stays the source of truth across engines; this cache only saves the pull on the engine
that already holds the blocks. Safe to call from several threads (one lock, held briefly).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from engine.errors import OutOfBlocks


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._lock = threading.Lock()
        self._refs = [0] * num_blocks
        # Ordered from next-to-evict to most recently freed; the values are unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key_of: dict[int, str] = {}
        self._block_of: dict[str, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: never used, or cached and unreferenced."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def allocate(self, n: int) -> list[int]:
        """`n` blocks from the head of the free queue, each referenced once; a cached block
        taken this way loses its key (it is evicted)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            if n > len(self._free):
                raise OutOfBlocks(f"requested {n} blocks, only {len(self._free)} free")
            ids = [self._free.popitem(last=False)[0] for _ in range(n)]
            for block_id in ids:
                self._refs[block_id] = 1
                key = self._key_of.pop(block_id, None)
                if key is not None:
                    del self._block_of[key]
                    self.evictions += 1
            return ids

    def free(self, ids: Iterable[int]) -> None:
        """Drops one reference from each block; blocks left unreferenced join the tail of the
        free queue in the given order, their keys kept."""
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate block ids in free(): {ids}")
        with self._lock:
            for block_id in ids:
                if not 0 <= block_id < self.num_blocks:
                    raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
                if self._refs[block_id] == 0:
                    raise ValueError(f"block id {block_id} freed twice")
            for block_id in ids:
                self._refs[block_id] -= 1
                if self._refs[block_id] == 0:
                    self._free[block_id] = None

    def touch(self, ids: Iterable[int]) -> None:
        """One more reference to each (already allocated or cached) block; a cached block
        that was free leaves the free queue."""
        with self._lock:
            for block_id in ids:
                if self._refs[block_id] == 0:
                    assert block_id in self._key_of, f"block {block_id} is neither held nor cached"
                    del self._free[block_id]
                self._refs[block_id] += 1

    def cached_prefix(self, keys: Sequence[str]) -> list[int]:
        """Block ids of the longest leading run of `keys` this engine holds. Not referenced:
        `touch` them before the next allocation can evict them."""
        out: list[int] = []
        with self._lock:
            for key in keys:
                block_id = self._block_of.get(key)
                if block_id is None:
                    break
                out.append(block_id)
        return out

    def unreferenced(self, ids: Iterable[int]) -> int:
        """How many of `ids` sit in the free queue (touching them uses up free blocks)."""
        with self._lock:
            return sum(1 for block_id in ids if self._refs[block_id] == 0)

    def cache(self, key: str, block_id: int) -> bool:
        """Indexes a full, final, held block under its key. False when the key already names
        another block (two sequences computed the same prefix): this one stays unindexed."""
        with self._lock:
            assert self._refs[block_id] > 0, f"block {block_id} cached while not held"
            if key in self._block_of:
                return self._block_of[key] == block_id
            old = self._key_of.get(block_id)
            assert old is None, f"block {block_id} is already cached under {old}"
            self._block_of[key] = block_id
            self._key_of[block_id] = key
            return True
