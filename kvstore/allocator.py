"""Slot allocation inside one node's segment: a buddy allocator over power-of-two size classes.

Every object gets a slot whose size is the smallest power of two >= max(length, min_slot).
Slots are carved on demand by splitting larger free blocks, and a freed slot merges with its
free buddy, so space released by one size class is reusable by any other. Allocation takes the
lowest free offset of the class, which keeps placement deterministic (tests assert offsets).

The free blocks of each size are a sorted list, kept exact on every split and merge, so the
allocator holds one entry per free block whatever the number of cycles it has been through.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable


def slot_size(length: int, min_slot: int) -> int:
    return max(min_slot, 1 << max(0, length - 1).bit_length())


class BuddyAllocator:
    def __init__(self, capacity: int, min_slot: int = 4096) -> None:
        assert min_slot > 0 and min_slot & (min_slot - 1) == 0, "min_slot must be a power of 2"
        self.min_slot = min_slot
        self.capacity = capacity - capacity % min_slot
        self.used = 0
        self._free: dict[int, list[int]] = {}
        self._allocated: dict[int, int] = {}
        # A segment that is not a power of two is covered by descending power-of-two blocks,
        # each aligned to its own size, so buddy arithmetic (offset ^ size) stays valid.
        self._tops: list[tuple[int, int]] = []
        offset = 0
        remaining = self.capacity
        while remaining >= min_slot:
            size = 1 << (remaining.bit_length() - 1)
            self._tops.append((offset, size))
            self._push(size, offset)
            offset += size
            remaining -= size

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def free_blocks(self) -> int:
        """Entries in the free index: exactly one per free block."""
        return sum(len(v) for v in self._free.values())

    def _push(self, size: int, offset: int) -> None:
        bisect.insort(self._free.setdefault(size, []), offset)

    def _remove(self, size: int, offset: int) -> bool:
        blocks = self._free.get(size)
        if not blocks:
            return False
        i = bisect.bisect_left(blocks, offset)
        if i == len(blocks) or blocks[i] != offset:
            return False
        del blocks[i]
        return True

    def allocate(self, length: int) -> tuple[int, int] | None:
        """(offset, slot size) of a fresh slot for `length` bytes, or None when none fits."""
        size = slot_size(length, self.min_slot)
        candidates = sorted(s for s, blocks in self._free.items() if s >= size and blocks)
        if not candidates:
            return None
        block = candidates[0]
        off = self._free[block].pop(0)
        while block > size:
            block //= 2
            self._push(block, off + block)
        self._allocated[off] = size
        self.used += size
        return off, size

    def reserve(self, offset: int, length: int) -> int | None:
        """Allocate exactly the slot for `length` bytes at `offset` (rebuilding the allocation
        of objects that already exist); its size, or None when that slot is not free."""
        size = slot_size(length, self.min_slot)
        if offset % size or offset + size > self.capacity:
            return None
        for block in sorted(s for s in self._free if s >= size):
            blocks = self._free[block]
            i = bisect.bisect_right(blocks, offset) - 1
            if i < 0 or not blocks[i] <= offset < blocks[i] + block:
                continue
            base = blocks.pop(i)
            # Split down to the slot, keeping each half that does not hold it free.
            while block > size:
                block //= 2
                if offset < base + block:
                    self._push(block, base + block)
                else:
                    self._push(block, base)
                    base += block
            self._allocated[offset] = size
            self.used += size
            return size
        return None

    def free(self, offset: int) -> None:
        size = self._allocated.pop(offset)
        self.used -= size
        # Merging stops at a block whose buddy lies past the segment, or whose buddy is of
        # another size: top-level blocks of a non-power-of-two segment have no buddy.
        while True:
            buddy = offset ^ size
            if buddy + size > self.capacity or min(offset, buddy) % (2 * size) != 0:
                break
            if not self._remove(size, buddy):
                break
            offset = min(offset, buddy)
            size *= 2
        self._push(size, offset)

    def eviction_plan(self, length: int, candidates: list[int],
                      evictable: Callable[[int], bool]) -> list[int] | None:
        """Slots (offsets) whose freeing makes room for `length` bytes, or None when none does.

        Considers, in the order of `candidates` (allocated offsets, e.g. least recently used
        first), the aligned block of the needed size around each; the first block whose
        allocated slots are all `evictable` is the plan. Everything else is left alone: the
        plan frees exactly one block, so an allocation never evicts objects it cannot use.
        """
        size = slot_size(length, self.min_slot)
        seen: set[int] = set()
        ordered = sorted(self._allocated)
        for start in candidates:
            slot = self._allocated.get(start)
            if slot is None:
                continue
            base = start if slot >= size else start - start % size
            span = max(slot, size)
            if base in seen or not self._inside_top(base, span):
                continue
            seen.add(base)
            lo = bisect.bisect_left(ordered, base)
            hi = bisect.bisect_left(ordered, base + span)
            victims = ordered[lo:hi]
            if all(evictable(v) for v in victims):
                return victims
        return None

    def _inside_top(self, offset: int, size: int) -> bool:
        return any(top <= offset and offset + size <= top + tsize and size <= tsize
                   for top, tsize in self._tops)
