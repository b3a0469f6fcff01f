"""Slot allocation inside one node's segment: slab classes sized after what is stored.

Every object goes in a fixed-size slot of its size class. A class is created the first time a
size is asked for, with slots of that size rounded up to a small granule (at most 1/64 of the
size, at most 4 KiB), so a block of any model wastes well under 5%; later sizes within
`SHARE_FRACTION` below a class's slot share it rather than make a class of their own. Slots
are carved from slab pages of `per_page` slots each (about `page_bytes`, like memcached's 1 MiB
pages, or one slot for objects larger than that), each rounded up to a 4 KiB boundary (a tail
of under 4 KiB, so pages, and the 4 KiB-granule slots of large objects, stay page-aligned for
DMA and O_DIRECT). Pages and the free gaps between them tile the segment (the map is
`kvstore.slab_pages`): a page is carved from the lowest gap that holds it and goes back to the
gaps (merged with its neighbours) as soon as its last slot is freed, so space one class stops
using serves any other.

When a class has no free slot and no gap holds a slot of it, it first takes the free tail of
another class's page (slots nobody uses: nothing is evicted). Failing that, rebalancing
(memcached's slab_reassign and slab_automove): `eviction_plan` either evicts the least recently
used evictable object of the class itself, or, when pages of other classes have sat idle longer
than that object, the idlest run of contiguous pages that frees room for a slot
(kvstore.slab_rebalance): its objects are evicted, the pages go back to the gaps, and the
starving class carves its page there. A page holding an object that is not evictable (leased,
pending, a zombie slot) is never part of a plan.

Recovery adopts objects at the offsets a segment scan finds them (`reserve`): an object in a gap
opens a page of its class starting at the object, and a page found to reach over an object of
another class or alignment gives back its free tail slots. Adopting in offset order rebuilds the
pages a full segment had, since objects of one page sit a whole number of slots apart.

Everything held is proportional to the live pages and slots: nothing grows with the number of
allocations a node has been through.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvstore.slab_classes import (
    ALIGN,
    KIB,
    MAX_CLASSES,
    PAGE_ALIGN,
    PAGE_BYTES,
    SHARE_FRACTION,
    round_up,
    slot_bytes,
)
from kvstore.slab_pages import Page, SegmentMap, SlabClass
from kvstore.slab_rebalance import Block, idlest_run


@dataclass(frozen=True)
class ClassStats:
    slot_bytes: int
    pages: int
    slots: int
    used_slots: int


class SlabAllocator:
    def __init__(self, capacity: int, min_slot: int = 4 * KIB, page_bytes: int = PAGE_BYTES,
                 max_classes: int = MAX_CLASSES) -> None:
        assert min_slot >= ALIGN and min_slot % ALIGN == 0, "min_slot must be a multiple of 64"
        self.min_slot = min_slot
        self.page_bytes = page_bytes
        self.max_classes = max_classes
        self.capacity = max(0, capacity - capacity % ALIGN)
        self.used = 0
        self._classes: dict[int, SlabClass] = {}
        self._slots: list[int] = []  # slot sizes of the classes, ascending
        self._map = SegmentMap(self.capacity)
        self._allocated: dict[int, Page] = {}

    # ---- introspection ----------------------------------------------------------------------

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def classes(self) -> list[ClassStats]:
        """Each live class, by slot size."""
        out = []
        for slot in self._slots:
            c = self._classes[slot]
            pages = [p for p in self._map.pages.values() if p.cls is c]
            out.append(ClassStats(slot, c.pages, sum(p.slots for p in pages),
                                  sum(p.used for p in pages)))
        return out

    def pages(self) -> list[tuple[int, int, int]]:
        """(start, slot size, slots) of every page, by address."""
        pages = self._map.pages
        return [(s, pages[s].cls.slot, pages[s].slots) for s in self._map.page_starts]

    def gaps(self) -> list[tuple[int, int]]:
        """(start, end) of every free gap, by address."""
        return self._map.gaps()

    def entries(self) -> int:
        """Entries the allocator holds (classes, pages, gaps, free and used slots): what
        bounds its memory."""
        return (len(self._classes) + len(self._map.pages) + len(self._map.gap_starts)
                + sum(len(c.free) for c in self._classes.values()) + len(self._allocated))

    def check(self) -> None:
        """Assert every invariant (for tests): pages and gaps tile the segment, gaps are
        merged, each page's free and used slots add up, and `used` is the slots in use."""
        blocks = sorted([(s, e, False) for s, e in self.gaps()]
                        + [(p.start, p.end, True) for p in self._map.pages.values()])
        at, prev_gap = 0, False
        for start, end, is_page in blocks:
            assert start == at < end, f"hole or overlap at {at}: block [{start}, {end})"
            assert is_page or not prev_gap, f"unmerged gaps at {start}"
            at, prev_gap = end, not is_page
        assert at == self.capacity, f"blocks end at {at}, not {self.capacity}"
        used = 0
        for page in self._map.pages.values():
            cls = page.cls
            assert self._classes.get(cls.slot) is cls and page.slots >= 1
            assert page.slots_end <= page.end < page.slots_end + PAGE_ALIGN
            slots = set(range(page.start, page.slots_end, cls.slot))
            free = set(cls.free[bisect.bisect_left(cls.free, page.start):
                                bisect.bisect_left(cls.free, page.end)])
            taken = {o for o, p in self._allocated.items() if p is page}
            assert free | taken == slots and not free & taken and len(taken) == page.used >= 1
            used += len(taken) * cls.slot
        assert used == self.used, f"used {self.used}, slots in use {used}"
        assert self._slots == sorted(self._classes)
        for cls in self._classes.values():
            assert cls.free == sorted(cls.free)
            assert cls.pages == sum(p.cls is cls for p in self._map.pages.values()) >= 1

    # ---- classes ----------------------------------------------------------------------------

    def _class_slot(self, length: int) -> tuple[int, bool]:
        """(slot size, whether that class exists) of the class `length` bytes would go in."""
        new = slot_bytes(length, self.min_slot)
        i = bisect.bisect_left(self._slots, length)
        if i < len(self._slots):
            slot = self._slots[i]
            if slot <= max(new, length / (1.0 - SHARE_FRACTION)) or (
                    len(self._slots) >= self.max_classes):
                return slot, True
        return new, False

    def _class_for(self, length: int) -> SlabClass:
        slot, exists = self._class_slot(length)
        if exists:
            return self._classes[slot]
        cls = self._classes[slot] = SlabClass(slot, max(1, self.page_bytes // slot))
        bisect.insort(self._slots, slot)
        return cls

    def _drop_if_unused(self, cls: SlabClass) -> None:
        if cls.pages == 0 and self._classes.get(cls.slot) is cls:
            del self._classes[cls.slot]
            self._slots.remove(cls.slot)

    # ---- gaps and pages ---------------------------------------------------------------------

    def _open_page(self, cls: SlabClass, gap: int, start: int) -> Page:
        """A page of `cls` at `start` inside the gap beginning at `gap`, as many slots as the
        class's pages hold or the gap has room for."""
        end = self._map.take_gap(gap)
        slots = min(cls.per_page, (end - start) // cls.slot)
        assert slots >= 1, "a page holds at least one slot"
        page = Page(start, min(end, round_up(start + slots * cls.slot, PAGE_ALIGN)), slots, cls)
        if gap < start:
            self._map.add_gap(gap, start)
        if page.end < end:
            self._map.add_gap(page.end, end)
        self._map.add_page(page)
        cls.pages += 1
        free = range(start, page.slots_end, cls.slot)
        i = bisect.bisect_left(cls.free, start)
        cls.free[i:i] = free
        return page

    def _carve(self, cls: SlabClass) -> bool:
        """Open a page of `cls` in the lowest gap that holds a slot of it; failing that, in
        the free tail of the lowest page of another class whose tail (with the gap after it)
        holds one: trimming slots nobody uses evicts nothing."""
        for gap in self._map.gap_starts:
            if self._map.gap_end[gap] - gap >= cls.slot:
                self._open_page(cls, gap, gap)
                return True
        for start in self._pages_with_free_slots(but=cls):
            page = self._map.pages[start]
            keep = self._slots_in_use_to(page)
            cut = min(page.end, round_up(page.start + keep * page.cls.slot, PAGE_ALIGN))
            room = self._map.gap_end.get(page.end, page.end) - cut
            if room >= cls.slot:
                self._shrink(page, keep, cut)
                freed = self._map.gap_at(cut)
                assert freed == cut, "the trimmed tail starts a gap"
                self._open_page(cls, cut, cut)
                return True
        return False

    def _pages_with_free_slots(self, but: SlabClass) -> list[int]:
        """Starts of the pages of other classes than `but` that have a free slot, ascending
        (found from the free lists: a full pool with one class looks at nothing)."""
        starts = []
        for cls in self._classes.values():
            i = 0
            while cls is not but and i < len(cls.free):
                page = self._map.page_at(cls.free[i])
                assert page is not None and page.cls is cls
                starts.append(page.start)
                i = bisect.bisect_left(cls.free, page.slots_end, lo=i)
        return sorted(starts)

    def _slots_in_use_to(self, page: Page) -> int:
        """How many of the page's slots come before the end of its last slot in use."""
        free = page.cls.free
        hi = bisect.bisect_left(free, page.slots_end)
        keep = page.slots
        # Walk back over the free slots at the page's end.
        while hi > 0 and keep > 0 and free[hi - 1] == page.start + (keep - 1) * page.cls.slot:
            hi -= 1
            keep -= 1
        return keep

    def _shrink(self, page: Page, slots: int, end: int | None = None) -> None:
        """Cut `page` down to its first `slots` slots (those past them are free), ending at
        `end` (default: right after them); the rest goes back to the gaps, and a page cut to
        nothing is gone."""
        cls = page.cls
        old_end = page.end
        lo = bisect.bisect_left(cls.free, page.start + slots * cls.slot)
        hi = bisect.bisect_left(cls.free, page.slots_end)
        assert hi - lo == page.slots - slots, "only free slots are cut off a page"
        del cls.free[lo:hi]
        page.end = page.start + slots * cls.slot if end is None else end
        if slots == 0:
            self._map.remove_page(page)
            cls.pages -= 1
            self._drop_if_unused(cls)
        page.slots = slots
        if page.end < old_end:
            self._map.add_gap(page.end, old_end)

    # ---- the interface the master uses ------------------------------------------------------

    def allocate(self, length: int) -> tuple[int, int] | None:
        """(offset, slot size) of a fresh slot for `length` bytes, or None when none fits:
        the lowest free slot of the class, else the first slot of a new page in the lowest
        gap that holds one."""
        assert length > 0, "an object has at least one byte"
        cls = self._class_for(length)
        if not cls.free and not self._carve(cls):
            self._drop_if_unused(cls)
            return None
        offset = cls.free.pop(0)
        page = self._map.page_at(offset)
        assert page is not None and page.cls is cls
        self._take(page, offset)
        return offset, cls.slot

    def _take(self, page: Page, offset: int) -> None:
        page.used += 1
        self._allocated[offset] = page
        self.used += page.cls.slot

    def reserve(self, offset: int, length: int) -> int | None:
        """Allocate the slot for `length` bytes at `offset` (adopting an object that already
        exists there); its size, or None when the space is taken."""
        if offset < 0 or offset % ALIGN or length <= 0 or offset + length > self.capacity:
            return None
        page = self._map.page_at(offset)
        if page is not None:
            slot, _ = self._class_slot(length)
            index, misaligned = divmod(offset - page.start, page.cls.slot)
            index = min(index, page.slots)  # in the page's tail: past every slot
            if page.cls.slot == slot and not misaligned and index < page.slots:
                i = bisect.bisect_left(page.cls.free, offset)
                if i == len(page.cls.free) or page.cls.free[i] != offset:
                    return None
                del page.cls.free[i]
                self._take(page, offset)
                return slot
            # A page opened for an earlier object reaches over this one: it keeps the slots
            # before this object's, if every slot from there on is free.
            cut = page.start + index * page.cls.slot
            if any(cut <= o for o in self._allocated_in(page)):
                return None
            self._shrink(page, index)
        gap = self._map.gap_at(offset)
        if gap is None:
            return None
        cls = self._class_for(length)
        if offset + cls.slot > self._map.gap_end[gap]:
            self._drop_if_unused(cls)
            return None
        page = self._open_page(cls, gap, offset)
        i = bisect.bisect_left(cls.free, offset)
        assert cls.free[i] == offset
        del cls.free[i]
        self._take(page, offset)
        return cls.slot

    def _allocated_in(self, page: Page) -> Iterable[int]:
        taken = set(range(page.start, page.slots_end, page.cls.slot)).difference(
            page.cls.free[bisect.bisect_left(page.cls.free, page.start):
                          bisect.bisect_left(page.cls.free, page.end)])
        return sorted(taken)

    def free(self, offset: int) -> None:
        page = self._allocated.pop(offset)
        cls = page.cls
        page.used -= 1
        self.used -= cls.slot
        if page.used:
            bisect.insort(cls.free, offset)
            return
        # The page's last object: the whole page goes back to the gaps, for any class.
        lo = bisect.bisect_left(cls.free, page.start)
        hi = bisect.bisect_left(cls.free, page.end)
        assert hi - lo == page.slots - 1, "every other slot of an emptied page is free"
        del cls.free[lo:hi]
        self._map.remove_page(page)
        cls.pages -= 1
        self._map.add_gap(page.start, page.end)
        self._drop_if_unused(cls)

    def eviction_plan(self, length: int, candidates: Iterable[int],
                      evictable: Callable[[int], bool]) -> list[int] | None:
        """Offsets to evict so that `allocate(length)` then succeeds, or None when no
        evictable set of objects makes room.

        `candidates`: allocated offsets, least recently used first (an offset not among them
        counts as the most recently used), read only as far as the class's own victim. Two
        plans are weighed: the least recently used evictable object of the length's own
        class (one slot), and the idlest run of contiguous pages and gaps, all of whose
        objects are evictable, that frees room for a page of the class, idleness being the
        most recent use of any object in the run. The run is taken when all of its objects
        were used before the class's own candidate (its pages idle while this class
        starves), or when the class has none."""
        slot, exists = self._class_slot(length)
        own: int | None = None  # the offset of the class's own victim
        older: list[int] = []  # the candidates ahead of it
        cls = self._classes[slot] if exists else None
        for offset in candidates:
            page = self._allocated.get(offset)
            if cls is not None and page is not None and page.cls is cls and evictable(offset):
                own = offset
                break
            older.append(offset)
        # A run beats the own victim only if every object in it was used before that victim:
        # only the candidates ahead of it can be in such a run (none: the own victim wins).
        run = self._idlest_run(slot, older, evictable) if older else None
        if run is not None:
            return run
        return None if own is None else [own]

    def _idlest_run(self, slot: int, older: list[int],
                    evictable: Callable[[int], bool]) -> list[int] | None:
        """Victims of the idlest run of pages and gaps spanning `slot` bytes, made only of
        pages whose objects are all among `older` (least recently used first) and evictable."""
        held: dict[int, list[tuple[int, int]]] = {}  # page start -> (position, offset)
        for i, offset in enumerate(older):
            page = self._allocated.get(offset)
            if page is not None:
                held.setdefault(page.start, []).append((i, offset))
        # The segment in address order as (start, end, latest use, victims); a page holding
        # an object that may not be evicted, or one used since, blocks every run through it.
        blocks: list[Block | None] = []
        for start, end, page in self._map.in_address_order():
            if page is None:
                blocks.append((start, end, -1, []))
                continue
            mine = held.get(page.start, [])
            if len(mine) == page.used and all(evictable(o) for _, o in mine):
                blocks.append((page.start, page.end, max(i for i, _ in mine),
                               sorted(o for _, o in mine)))
            else:
                blocks.append(None)
        return idlest_run(blocks, slot)
