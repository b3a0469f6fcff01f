"""The slab rebalancer's choice: which run of contiguous pages a starving class takes.

The allocator describes its segment in address order as blocks: a gap or a page whose objects
may all be evicted, as (start, end, latest use, victims), or None for a page that may not move
(an object in it is leased, pending, or used more recently than the starving class's own
victim). The run taken is the one whose most recent use is the oldest (memcached's automove
moves the page of the class that has idled longest), then the one with the fewest victims, then
the lowest; it spans at least one slot of the starving class and stops as soon as it does, so
nothing is evicted that the class cannot use.
"""

from __future__ import annotations

from collections.abc import Sequence

Block = tuple[int, int, int, list[int]]  # start, end, latest use (-1: a gap), victims


def idlest_run(blocks: Sequence[Block | None], slot: int) -> list[int] | None:
    """Victims of the idlest run of blocks spanning `slot` bytes, or None when no run of
    movable blocks does (or the only ones are gaps, which the allocator has used already)."""
    best: tuple[int, int, int, int, int] | None = None  # latest, victims, start, i, j
    for i, first in enumerate(blocks):
        if first is None:
            continue
        latest = count = 0
        for j in range(i, len(blocks)):
            block = blocks[j]
            if block is None:
                break
            latest = max(latest, block[2])
            count += len(block[3])
            if block[1] - first[0] >= slot:
                if count and (best is None or (latest, count, first[0]) < best[:3]):
                    best = (latest, count, first[0], i, j)
                break
    if best is None:
        return None
    return [v for block in blocks[best[3]:best[4] + 1] if block for v in block[3]]
