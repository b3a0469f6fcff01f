"""Allocation of KV cache block ids."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from engine.errors import OutOfBlocks


class BlockAllocator:
    """Free list of block ids that always hands out the lowest free ids first.

    Deterministic order keeps tests and cross-process block tables reproducible.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))
        self._free_set: set[int] = set(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocks(f"requested {n} blocks, only {len(self._free)} free")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._free_set.difference_update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        for block_id in ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
            if block_id in self._free_set:
                raise ValueError(f"block id {block_id} freed twice")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate block ids in free(): {ids}")
        for block_id in ids:
            heapq.heappush(self._free, block_id)
            self._free_set.add(block_id)
