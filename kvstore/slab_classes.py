"""Slab class sizes: the slot a class gets for an object size, its pages, and what they waste.

Slots are an object size rounded up to a granule of at most 1/GRANULE_DIVISOR of the size (64
bytes, the object header's alignment, doubling up to 4 KiB), so rounding costs under 1.6%;
pages hold about PAGE_BYTES of slots and end on a PAGE_ALIGN boundary. `waste_fraction` is what
a benchmark or an operator asks: how much of a node's memory a given block size leaves unused.
"""

from __future__ import annotations

from kvstore.block_object import HEADER_ALIGN
from pantry.common.config_flags import KIB, MIB

# Objects start at multiples of the header's alignment, so their payloads stay aligned too.
ALIGN = HEADER_ALIGN
# The coarsest granule slot sizes are rounded to: page-aligned slots for large objects.
MAX_GRANULE = 4 * KIB
# Slot sizes are rounded to a granule of at most 1/GRANULE_DIVISOR of the size (< 1.6% waste).
GRANULE_DIVISOR = 64
# A size shares an existing class whose slot is at most this fraction larger than the size...
SHARE_FRACTION = 0.03
# ...and past this many classes, a size takes the smallest larger class whatever it wastes.
MAX_CLASSES = 64
# A slab page holds this many bytes of slots (at least one slot), like memcached's pages...
PAGE_BYTES = 1 * MIB
# ...and ends on a multiple of this, so pages (and large objects' slots) start page-aligned.
PAGE_ALIGN = 4 * KIB


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def slot_bytes(length: int, min_slot: int) -> int:
    """The slot size of a class created for `length`-byte objects."""
    if length <= min_slot:
        return min_slot
    granule = ALIGN
    while granule < MAX_GRANULE and granule * 2 * GRANULE_DIVISOR <= length:
        granule *= 2
    return round_up(length, granule)


def page_bytes_for(object_bytes: int, min_slot: int = 4 * KIB, page_bytes: int = PAGE_BYTES
                   ) -> int:
    """Bytes of a full slab page of the class created for `object_bytes`-byte objects."""
    slot = slot_bytes(object_bytes, min_slot)
    return round_up(max(1, page_bytes // slot) * slot, PAGE_ALIGN)


def waste_fraction(object_bytes: int, min_slot: int = 4 * KIB, page_bytes: int = PAGE_BYTES
                   ) -> float:
    """Fraction of a full slab page of `object_bytes`-byte objects that holds no object
    bytes: slot rounding plus the page's tail (under PAGE_ALIGN). (A segment's own tail, less
    than one page, comes on top: it is the segment's size, not the allocator's doing.)"""
    assert object_bytes > 0, "an object has at least one byte"
    slot = slot_bytes(object_bytes, min_slot)
    page = page_bytes_for(object_bytes, min_slot, page_bytes)
    return 1.0 - (page // slot) * object_bytes / page
