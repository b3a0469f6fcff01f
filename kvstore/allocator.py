"""Slot allocation inside one node's segment: a buddy allocator over power-of-two size classes.

Every object gets a slot whose size is the smallest power of two >= max(length, min_slot).
Slots are carved on demand by splitting larger free blocks, and a freed slot merges with its
free buddy, so space released by one size class is reusable by any other. Allocation takes the
lowest free offset of the class, which keeps placement deterministic (tests assert offsets).
"""

from __future__ import annotations

import heapq


def slot_size(length: int, min_slot: int) -> int:
    return max(min_slot, 1 << max(0, length - 1).bit_length())


class BuddyAllocator:
    def __init__(self, capacity: int, min_slot: int = 4096) -> None:
        assert min_slot > 0 and min_slot & (min_slot - 1) == 0, "min_slot must be a power of 2"
        self.min_slot = min_slot
        self.capacity = capacity - capacity % min_slot
        self.used = 0
        # Per block size: a set for membership (buddy merge) and a heap for lowest-offset-first;
        # heap entries no longer in the set are stale and skipped lazily.
        self._free: dict[int, set[int]] = {}
        self._heap: dict[int, list[int]] = {}
        self._allocated: dict[int, int] = {}
        # A segment that is not a power of two is covered by descending power-of-two blocks,
        # each aligned to its own size, so buddy arithmetic (offset ^ size) stays valid.
        offset = 0
        remaining = self.capacity
        while remaining >= min_slot:
            size = 1 << (remaining.bit_length() - 1)
            self._push(size, offset)
            offset += size
            remaining -= size

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def _push(self, size: int, offset: int) -> None:
        self._free.setdefault(size, set()).add(offset)
        heapq.heappush(self._heap.setdefault(size, []), offset)

    def _pop(self, size: int) -> int | None:
        free, heap = self._free.get(size), self._heap.get(size)
        while heap:
            off = heapq.heappop(heap)
            if free is not None and off in free:
                free.discard(off)
                return off
        return None

    def allocate(self, length: int) -> tuple[int, int] | None:
        """(offset, slot size) of a fresh slot for `length` bytes, or None when none fits."""
        size = slot_size(length, self.min_slot)
        candidates = sorted(s for s, blocks in self._free.items() if s >= size and blocks)
        for block in candidates:
            off = self._pop(block)
            if off is None:
                continue
            while block > size:
                block //= 2
                self._push(block, off + block)
            self._allocated[off] = size
            self.used += size
            return off, size
        return None

    def free(self, offset: int) -> None:
        size = self._allocated.pop(offset)
        self.used -= size
        # Merging stops at a block whose buddy lies past the segment, or whose buddy is of
        # another size: top-level blocks of a non-power-of-two segment have no buddy.
        while True:
            buddy = offset ^ size
            free = self._free.get(size)
            if free is None or buddy not in free or buddy + size > self.capacity:
                break
            if min(offset, buddy) % (2 * size) != 0:
                break
            free.discard(buddy)
            offset = min(offset, buddy)
            size *= 2
        self._push(size, offset)
