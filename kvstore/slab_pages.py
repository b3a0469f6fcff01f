"""What lies where in a node's segment, for the slab allocator: slab pages (each the slots of
one size class) and the free gaps between them, tiling the segment by address. Freed space
goes back to the gaps merged with its neighbours, so a gap is always as large as the free run
it stands in."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class SlabClass:
    slot: int
    per_page: int
    pages: int = 0
    # Offsets of the free slots in this class's pages, ascending.
    free: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Page:
    start: int
    end: int  # the last slot's end, then the tail up to a PAGE_ALIGN boundary
    slots: int
    cls: SlabClass
    used: int = 0

    @property
    def slots_end(self) -> int:
        return self.start + self.slots * self.cls.slot


class SegmentMap:
    """The pages (by start) and gaps (start -> end) of a segment of `capacity` bytes, all of
    it one gap at first."""

    def __init__(self, capacity: int) -> None:
        self.pages: dict[int, Page] = {}
        self.page_starts: list[int] = []  # ascending
        self.gap_starts: list[int] = []  # ascending
        self.gap_end: dict[int, int] = {}
        if capacity:
            self.add_gap(0, capacity)

    def gaps(self) -> list[tuple[int, int]]:
        """(start, end) of every free gap, by address."""
        return [(s, self.gap_end[s]) for s in self.gap_starts]

    def add_gap(self, start: int, end: int) -> None:
        """Give [start, end) back to the gaps, merged with the gaps it touches."""
        i = bisect.bisect_left(self.gap_starts, start)
        if i > 0 and self.gap_end[self.gap_starts[i - 1]] == start:
            i -= 1
            start = self.gap_starts[i]
            del self.gap_starts[i]
            del self.gap_end[start]
        if i < len(self.gap_starts) and self.gap_starts[i] == end:
            end = self.gap_end.pop(self.gap_starts[i])
            del self.gap_starts[i]
        self.gap_starts.insert(i, start)
        self.gap_end[start] = end

    def take_gap(self, start: int) -> int:
        """Take the whole gap beginning at `start` out of the gaps; its end."""
        end = self.gap_end.pop(start)
        self.gap_starts.remove(start)
        return end

    def gap_at(self, offset: int) -> int | None:
        """The start of the gap `offset` lies in; None when it lies in a page."""
        i = bisect.bisect_right(self.gap_starts, offset) - 1
        if i >= 0 and offset < self.gap_end[self.gap_starts[i]]:
            return self.gap_starts[i]
        return None

    def page_at(self, offset: int) -> Page | None:
        """The page `offset` lies in (its slots or its tail); None when it lies in a gap."""
        i = bisect.bisect_right(self.page_starts, offset) - 1
        if i >= 0:
            page = self.pages[self.page_starts[i]]
            if offset < page.end:
                return page
        return None

    def add_page(self, page: Page) -> None:
        bisect.insort(self.page_starts, page.start)
        self.pages[page.start] = page

    def remove_page(self, page: Page) -> None:
        self.page_starts.remove(page.start)
        del self.pages[page.start]

    def in_address_order(self) -> Iterator[tuple[int, int, Page | None]]:
        """(start, end, page) of every page and gap (page None), by address."""
        gap_i = page_i = 0
        while gap_i < len(self.gap_starts) or page_i < len(self.page_starts):
            next_gap = self.gap_starts[gap_i] if gap_i < len(self.gap_starts) else None
            next_page = self.page_starts[page_i] if page_i < len(self.page_starts) else None
            if next_page is None or (next_gap is not None and next_gap < next_page):
                assert next_gap is not None
                yield next_gap, self.gap_end[next_gap], None
                gap_i += 1
                continue
            page = self.pages[next_page]
            page_i += 1
            yield page.start, page.end, page
