"""The slab allocator: exact offsets, exact eviction plans, page rebalancing between classes,
recovery at fixed offsets, waste per model, bounded memory. In the style of vLLM v1's block
pool tests: every handed-out offset and every victim is asserted."""

from __future__ import annotations

import random

import pytest

from kvstore.block_object import encoded_size
from kvstore.config import MasterConfig
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo
from kvstore.slab_allocator import SlabAllocator
from kvstore.slab_classes import page_bytes_for, slot_bytes, waste_fraction
from pantry.common.config_flags import KIB, MIB

# A pool block's object: 32-hex fingerprint, 32-hex key, a 5-d shape, then the payload.
FINGERPRINT = "0" * 32


def block_object_bytes(payload: int) -> int:
    return encoded_size(FINGERPRINT, "bfloat16", (1, 2, 3, 4, 5), payload)


# KV bytes per 16-token block (K and V, all layers, bf16) of models engines serve.
MODEL_BLOCKS = {
    "SmolLM2 (issue 7)": 737_408,
    "Qwen2.5-0.5B": 16 * 24 * 2 * 2 * 64 * 2,
    "TinyLlama-1.1B": 16 * 22 * 2 * 4 * 64 * 2,
    "Qwen2.5-7B": 16 * 28 * 2 * 4 * 128 * 2,
    "Llama-3-8B / Mistral-7B": 16 * 32 * 2 * 8 * 128 * 2,
    "Llama-3-70B": 16 * 80 * 2 * 8 * 128 * 2,
    "bench 16 MiB": 16 * MIB,
}


def always(_: int) -> bool:
    return True


def test_slot_sizes_round_to_a_granule_of_at_most_a_64th() -> None:
    assert slot_bytes(1, 4 * KIB) == 4 * KIB  # the smallest slot
    assert slot_bytes(4 * KIB, 4 * KIB) == 4 * KIB
    assert slot_bytes(4 * KIB + 1, 4 * KIB) == 4 * KIB + 64  # 64-byte granule (header align)
    assert slot_bytes(10_064, 4 * KIB) == 10_112  # 128-byte granule from 8 KiB
    assert slot_bytes(100_000, 4 * KIB) == 100_352  # 1 KiB granule from 64 KiB
    assert slot_bytes(block_object_bytes(737_408), 4 * KIB) == 741_376  # 4 KiB granule
    assert block_object_bytes(737_408) == 737_600
    assert slot_bytes(2 * MIB + 192, 4 * KIB) == 2 * MIB + 4 * KIB


@pytest.mark.parametrize("model", list(MODEL_BLOCKS))
def test_every_models_blocks_waste_under_5_percent(model: str) -> None:
    size = block_object_bytes(MODEL_BLOCKS[model])
    assert waste_fraction(size) < 0.05
    # The formula is what a real allocator does: a segment of 6 pages filled with these
    # blocks holds 6 pages' worth of slots, and the bytes outside objects are the fraction.
    capacity = 6 * page_bytes_for(size)
    a = SlabAllocator(capacity)
    n = 0
    while a.allocate(size) is not None:
        n += 1
    assert n == 6 * (page_bytes_for(size) // slot_bytes(size, 4 * KIB))
    assert 1 - n * size / capacity == pytest.approx(waste_fraction(size))


def test_smollm2_waste_exact_and_the_buddy_slot_it_replaces() -> None:
    size = block_object_bytes(737_408)
    # One 741,376-byte slot a page: 0.51% lost, where a 1 MiB buddy slot lost 29.7%.
    assert page_bytes_for(size) == 741_376
    assert waste_fraction(size) == pytest.approx(1 - 737_600 / 741_376)
    assert waste_fraction(size) < 0.0051
    assert 1 - size / MIB > 0.29
    # 4 KiB objects: 256 a 1 MiB page, no waste at all.
    assert (page_bytes_for(4 * KIB), waste_fraction(4 * KIB)) == (1 * MIB, 0.0)


def test_exact_offsets_pages_carved_lowest_gap_first_and_given_back_when_empty() -> None:
    a = SlabAllocator(4 * MIB)
    # 64 KiB objects: one class, pages of 16 slots (1 MiB) carved from the lowest gap.
    assert [a.allocate(64 * KIB) for _ in range(3)] == [(0, 64 * KIB), (64 * KIB, 64 * KIB),
                                                         (128 * KIB, 64 * KIB)]
    # 96 KiB: a second class; its page (10 slots, 960 KiB) goes right after the first page.
    assert a.allocate(96 * KIB) == (1 * MIB, 96 * KIB)
    # 4 KiB: a third class, 256 slots a page.
    assert a.allocate(4 * KIB) == (1 * MIB + 960 * KIB, 4 * KIB)
    assert a.pages() == [(0, 64 * KIB, 16), (1 * MIB, 96 * KIB, 10),
                         (1 * MIB + 960 * KIB, 4 * KIB, 256)]
    assert a.gaps() == [(2 * MIB + 960 * KIB, 4 * MIB)]
    assert a.used == 3 * 64 * KIB + 96 * KIB + 4 * KIB
    # A freed slot is the lowest free slot of its class: it is handed out next.
    a.free(64 * KIB)
    assert a.allocate(64 * KIB) == (64 * KIB, 64 * KIB)
    # The 96 KiB page's last object goes: the page returns to the gaps and its class is gone.
    a.free(1 * MIB)
    assert [c.slot_bytes for c in a.classes()] == [4 * KIB, 64 * KIB]
    assert a.gaps() == [(1 * MIB, 1 * MIB + 960 * KIB), (2 * MIB + 960 * KIB, 4 * MIB)]
    # A 200 KiB class takes the lowest gap that holds a slot, with as many slots as fit there.
    assert a.allocate(200 * KIB) == (1 * MIB, 200 * KIB)
    assert a.pages()[1] == (1 * MIB, 200 * KIB, 4)
    assert a.gaps() == [(1 * MIB + 800 * KIB, 1 * MIB + 960 * KIB),
                        (2 * MIB + 960 * KIB, 4 * MIB)]
    for off in (0, 64 * KIB, 128 * KIB, 1 * MIB, 1 * MIB + 960 * KIB):
        a.free(off)
    assert a.used == 0 and a.pages() == [] and a.gaps() == [(0, 4 * MIB)]


def test_pages_end_on_4_kib_boundaries_and_a_tail_is_given_back_when_adopting() -> None:
    a = SlabAllocator(4 * MIB)
    # 10,112-byte slots, 103 a page: 1,041,536 bytes, then a tail to 1,044,480 (255 x 4 KiB).
    assert a.allocate(10_064) == (0, 10_112)
    assert a.allocate(64 * KIB) == (1_044_480, 64 * KIB)
    assert a.pages() == [(0, 10_112, 103), (1_044_480, 64 * KIB, 16)]
    assert page_bytes_for(10_064) == 1_044_480
    assert waste_fraction(10_064) == pytest.approx(1 - 103 * 10_064 / 1_044_480)
    # An object found in a page's tail (recovery): the tail goes back, the object is adopted.
    b = SlabAllocator(4 * MIB)
    assert b.reserve(0, 10_064) == 10_112
    assert b.reserve(1_041_536, 4 * KIB) == 4 * KIB
    assert b.pages() == [(0, 10_112, 103), (1_041_536, 4 * KIB, 256)]


def test_a_starving_class_takes_the_free_tail_of_another_classs_page_first() -> None:
    a = SlabAllocator(1 * MIB)
    assert a.allocate(100) == (0, 4 * KIB)  # a 4 KiB page of 256 slots: the whole segment
    # No gap left: the 4 KiB page's 255 free slots at its end go to the new class, unevicted.
    assert a.allocate(5000) == (4 * KIB, 5056)
    assert a.pages() == [(0, 4 * KIB, 1), (4 * KIB, 5056, 206)]
    # And back: the 5,056-byte page keeps its slot in use, cut at the next 4 KiB boundary.
    assert a.allocate(100) == (12 * KIB, 4 * KIB)
    assert a.pages() == [(0, 4 * KIB, 1), (4 * KIB, 5056, 1), (12 * KIB, 4 * KIB, 253)]
    assert a.gaps() == [] and a.used == 2 * 4 * KIB + 5056
    # A page whose last slot is in use has no tail to give: 100 KiB finds no room.
    b = SlabAllocator(1 * MIB)
    offs = [b.allocate(64 * KIB) for _ in range(16)]
    for got in offs[:-1]:
        assert got is not None
        b.free(got[0])
    assert b.allocate(100 * KIB) is None


def test_close_sizes_share_a_class_and_the_class_count_is_bounded() -> None:
    a = SlabAllocator(16 * MIB, max_classes=3)
    assert a.allocate(100_000) == (0, 100_352)
    assert a.allocate(98_000) == (100_352, 100_352)  # within 3% below the slot: shared
    assert a.allocate(96_000) is not None  # 4.3% below: a class of its own
    assert [c.slot_bytes for c in a.classes()] == [96_256, 100_352]
    assert a.allocate(50_000) is not None
    assert [c.slot_bytes for c in a.classes()] == [50_176, 96_256, 100_352]
    # Three classes: a fourth size takes the smallest larger class, whatever it wastes...
    assert a.allocate(20_000) == (a.pages()[2][0] + 50_176, 50_176)
    assert len(a.classes()) == 3
    # ...and a size larger than every class still gets one (no slot could hold it otherwise).
    assert a.allocate(300_000) is not None and len(a.classes()) == 4


def test_eviction_within_a_class_takes_its_least_recently_used_evictable_object() -> None:
    a = SlabAllocator(256 * KIB)
    assert [a.allocate(64 * KIB) for _ in range(4)] == [(i * 64 * KIB, 64 * KIB)
                                                         for i in range(4)]
    assert a.allocate(64 * KIB) is None
    lru = [128 * KIB, 0, 192 * KIB, 64 * KIB]
    assert a.eviction_plan(64 * KIB, lru, always) == [128 * KIB]
    assert a.eviction_plan(64 * KIB, lru, lambda o: o != 128 * KIB) == [0]
    assert a.eviction_plan(64 * KIB, lru, lambda o: False) is None
    a.free(0)
    assert a.allocate(64 * KIB) == (0, 64 * KIB)


def fill_two_classes() -> tuple[SlabAllocator, list[int], list[int]]:
    """2 MiB: 16 objects of 64 KiB in the page at 0, 8 of 128 KiB in the page at 1 MiB."""
    a = SlabAllocator(2 * MIB)
    small = [a.allocate(64 * KIB) for _ in range(16)]
    large = [a.allocate(128 * KIB) for _ in range(8)]
    assert a.pages() == [(0, 64 * KIB, 16), (1 * MIB, 128 * KIB, 8)] and a.gaps() == []
    return a, [s[0] for s in small if s], [x[0] for x in large if x]


def test_a_starving_class_takes_the_idle_page_of_another_class() -> None:
    a, small, large = fill_two_classes()
    # The 64 KiB objects were all used before any 128 KiB one: their page idles while the
    # 128 KiB class starves, so the page moves, with exactly its 16 objects as victims.
    assert a.eviction_plan(128 * KIB, small + large, always) == small
    for off in small:
        a.free(off)
    assert a.allocate(128 * KIB) == (0, 128 * KIB)
    assert a.pages() == [(0, 128 * KIB, 8), (1 * MIB, 128 * KIB, 8)]
    assert [(c.slot_bytes, c.pages, c.used_slots) for c in a.classes()] == [(128 * KIB, 2, 9)]


def test_a_class_evicts_its_own_object_when_the_other_class_is_busy_or_leased() -> None:
    a, small, large = fill_two_classes()
    # One 64 KiB object was used after the oldest 128 KiB one: that page is not idle.
    order = small[:5] + large[:1] + small[5:] + large[1:]
    assert a.eviction_plan(128 * KIB, order, always) == [large[0]]
    # Idle, but one of its objects is leased: a page holding it never moves.
    assert a.eviction_plan(128 * KIB, small + large, lambda o: o != small[9]) == [large[0]]
    # Nothing evictable anywhere: no plan at all.
    assert a.eviction_plan(128 * KIB, small + large, lambda o: False) is None


def test_a_new_class_takes_the_idlest_run_of_pages_that_holds_its_slot() -> None:
    a = SlabAllocator(4 * MIB)
    offs = [got[0] for got in (a.allocate(4 * KIB) for _ in range(1024)) if got]
    assert len(offs) == 1024 and a.allocate(4 * KIB) is None
    leased = 1 * MIB + 40 * KIB  # in the second page
    # 2 MiB need two adjacent pages: [0, 2 MiB) holds the leased object, so the run of the
    # third and fourth pages is taken, even though the first page is the least recently used.
    plan = a.eviction_plan(2 * MIB, offs, lambda o: o != leased)
    assert plan == list(range(2 * MIB, 4 * MIB, 4 * KIB))
    for off in plan:
        a.free(off)
    assert a.allocate(2 * MIB) == (2 * MIB, 2 * MIB)
    # With no lease, the idlest run is the first two pages (their latest use is the oldest).
    b = SlabAllocator(4 * MIB)
    for _ in range(1024):
        b.allocate(4 * KIB)
    assert b.eviction_plan(2 * MIB, offs, always) == list(range(0, 2 * MIB, 4 * KIB))
    # Used most recently first: the last two pages are the idlest.
    assert b.eviction_plan(2 * MIB, offs[::-1], always) == list(range(2 * MIB, 4 * MIB, 4 * KIB))


def test_reserve_rebuilds_pages_from_the_objects_a_scan_finds() -> None:
    a = SlabAllocator(8 * MIB)
    sizes = [64 * KIB] * 20 + [96 * KIB] * 12 + [200 * KIB] * 3
    got = [a.allocate(s) for s in sizes]
    live = [(g[0], s) for g, s in zip(got, sizes, strict=True) if g is not None]
    assert len(live) == len(sizes)
    for off, _ in live[1:20:3]:  # some holes, as a running pool has
        a.free(off)
    held = sorted(set(live) - set(live[1:20:3]))
    assert len(held) == len(live) - 7
    # A fresh allocator adopting them in offset order (as a node reports them) takes them all.
    b = SlabAllocator(8 * MIB)
    assert [b.reserve(off, s) for off, s in held] == [slot_bytes(s, 4 * KIB) for _, s in held]
    assert b.used == a.used
    assert b.reserve(held[0][0], held[0][1]) is None  # a taken slot is not taken twice
    # New objects never overlap an adopted one.
    taken = [(off, off + slot_bytes(s, 4 * KIB)) for off, s in held]
    while (new := b.allocate(64 * KIB)) is not None:
        taken.append((new[0], new[0] + new[1]))
    taken.sort()
    assert all(x[1] <= y[0] for x, y in zip(taken, taken[1:], strict=False))


def test_reserve_in_any_order_and_a_page_gives_back_its_free_tail() -> None:
    a = SlabAllocator(2 * MIB)
    # An object in a gap opens a page of its class at its own offset.
    assert a.reserve(64 * KIB, 64 * KIB) == 64 * KIB
    assert a.pages() == [(64 * KIB, 64 * KIB, 16)]
    # An object of another class inside that page's free tail: the page is cut before it.
    assert a.reserve(512 * KIB, 96 * KIB) == 96 * KIB
    assert a.pages() == [(64 * KIB, 64 * KIB, 7), (512 * KIB, 96 * KIB, 10)]
    # A misaligned object over a taken slot cannot be adopted; one before the page can.
    assert a.reserve(64 * KIB + 64, 64 * KIB) is None
    assert a.reserve(0, 64 * KIB) == 64 * KIB
    assert a.reserve(512 * KIB, 96 * KIB) is None
    assert a.reserve(2 * MIB - 64, 4 * KIB) is None  # past the end of the segment
    assert a.used == 2 * 64 * KIB + 96 * KIB
    # Shuffled: every object of a full, laid-out segment is still adopted.
    full = SlabAllocator(8 * MIB)
    objs = []
    for size in [64 * KIB] * 40 + [96 * KIB] * 30 + [4 * KIB] * 300:
        got = full.allocate(size)
        assert got is not None
        objs.append((got[0], size))
    random.Random(7).shuffle(objs)
    again = SlabAllocator(8 * MIB)
    assert all(again.reserve(off, size) is not None for off, size in objs)
    assert again.used == full.used


def test_random_allocations_frees_reservations_and_evictions_keep_every_invariant() -> None:
    rng = random.Random(11)
    a = SlabAllocator(8 * MIB)
    sizes = [100, 4 * KIB, 10_064, 64 * KIB, 96 * KIB, 200 * KIB, 737_600, 2 * MIB + 192]
    live: dict[int, int] = {}  # offset -> slot
    lru: list[int] = []
    for step in range(3000):
        size = rng.choice(sizes)
        roll = rng.random()
        if roll < 0.55:
            got = a.allocate(size)
            if got is None:
                plan = a.eviction_plan(size, lru, lambda o: o % 3 != 0)
                for off in plan or []:
                    a.free(off)
                    del live[off]
                    lru.remove(off)
                got = a.allocate(size)
                assert (got is None) == (plan is None), f"step {step}: the plan made no room"
            if got is not None:
                assert got[0] not in live and got[1] >= size
                live[got[0]] = got[1]
                lru.append(got[0])
        elif live and roll < 0.95:
            off = rng.choice(lru)
            a.free(off)
            del live[off]
            lru.remove(off)
        elif live:  # touch: most recently used now
            off = rng.choice(lru)
            lru.remove(off)
            lru.append(off)
        a.check()
        spans = sorted((o, o + n) for o, n in live.items())
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:], strict=False))
    # Everything adopted again at its offset, in offset order, as a node reports it.
    b = SlabAllocator(8 * MIB)
    for off in sorted(live):
        assert b.reserve(off, live[off]) == live[off]
    b.check()
    assert b.used == a.used


def test_memory_stays_bounded_over_100k_cycles() -> None:
    a = SlabAllocator(256 * MIB)
    held = [a.allocate(64 * KIB) for _ in range(100)]
    sizes = [4 * KIB, 100_000, 737_600, 2 * MIB + 4 * KIB, 64 * KIB]
    before = a.entries()
    for i in range(100_000):
        got = a.allocate(sizes[i % len(sizes)])
        assert got is not None
        a.free(got[0])
    assert a.entries() == before
    for got in held:
        assert got is not None
        a.free(got[0])
    # Empty again: one gap, the whole segment, and nothing else.
    assert a.entries() == 1 and a.gaps() == [(0, 256 * MIB)] and a.classes() == []


def make_master(capacity: int) -> Master:
    conf = MasterConfig(lease_ms=1000, high_watermark=1.0, low_watermark=1.0,
                        max_object_bytes=4 * MIB)
    m = Master(conf, clock=lambda: 1000.0)
    m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", capacity))
    return m


def put(m: Master, key: str, size: int) -> int:
    (grant,) = m.put_start([key], [size], "h1")
    assert grant.outcome is PutOutcome.ALLOCATED and grant.location is not None, grant
    assert m.put_end([(key, grant.location.token)]) == [True]
    return grant.location.offset


def test_two_models_in_one_pool_the_idle_models_page_moves_to_the_busy_one() -> None:
    m = make_master(2 * MIB)
    # Model A's blocks fill the first page and go idle; model B fills the second page.
    a_keys = [f"a{i}" for i in range(16)]
    b_keys = [f"b{i}" for i in range(8)]
    assert [put(m, k, 64 * KIB) for k in a_keys] == [i * 64 * KIB for i in range(16)]
    assert [put(m, k, 128 * KIB) for k in b_keys] == [1 * MIB + i * 128 * KIB for i in range(8)]
    # B keeps going: A's page (all 16 objects) is evicted and becomes a page of B's class.
    assert put(m, "b8", 128 * KIB) == 0
    assert m.evictions == 16 and m.exists(a_keys) == [False] * 16
    # Now B's own least recently used object goes, one at a time.
    assert put(m, "b9", 128 * KIB) == 128 * KIB
    assert put(m, "b10", 128 * KIB) == 256 * KIB
    assert put(m, "b11", 128 * KIB) == 384 * KIB
    assert put(m, "b12", 128 * KIB) == 512 * KIB
    assert put(m, "b13", 128 * KIB) == 640 * KIB
    assert put(m, "b14", 128 * KIB) == 768 * KIB
    assert put(m, "b15", 128 * KIB) == 896 * KIB
    assert put(m, "b16", 128 * KIB) == 1 * MIB  # b0's slot: B's LRU object
    assert m.evictions == 17 and m.exists(["b0", "b1", "b16"]) == [False, True, True]
