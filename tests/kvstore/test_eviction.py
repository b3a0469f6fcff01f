"""Eviction policies, pure: exact victims on hand-made sequences."""

from __future__ import annotations

import random

import pytest

from kvstore.eviction import (
    BlockHint,
    EvictionPolicy,
    LRUPolicy,
    ReuseAwarePolicy,
    belady_hit_rate,
    hints,
    hit_rate,
    make_policy,
)

MID = BlockHint(depth=1)


def test_lru_evicts_least_recently_touched() -> None:
    p = LRUPolicy()
    for k in "abc":
        p.touch(k, MID)
    p.touch("a", MID)
    assert [p.pop_victim() for _ in range(4)] == ["b", "c", "a", None]


def test_lru_hit_rate_block_by_block() -> None:
    # capacity 2: a b | a(hit) c -> evicts b | b(miss) a(miss: evicted by b)
    assert hit_rate(LRUPolicy(), [["a", "b"], ["a", "c"], ["b", "a"]], 2) == 1 / 6


def test_belady_keeps_what_is_needed_soonest() -> None:
    prompts = [["a", "b"], ["c", "a"], ["b"]]
    # capacity 2: c is never named again, so it is dropped at once and a, b both hit.
    assert belady_hit_rate(prompts, 2) == 2 / 5
    # capacity 1: a (needed at 3) is kept over b (at 4) and c (never): a's hit only.
    assert belady_hit_rate(prompts, 1) == 1 / 5
    assert belady_hit_rate([], 3) == 0.0


def test_reuse_aware_evicts_a_prompts_last_block_first() -> None:
    p = ReuseAwarePolicy()
    p.touch("root", BlockHint(0))
    p.touch("mid", BlockHint(1))
    p.touch("tail", BlockHint(2, last=True))
    p.touch("mid2", BlockHint(1))
    # Nothing read twice yet: p = 1 / (touches + 2) per class, so class 1 (two touches,
    # p = 1/4) goes before 'first' and 'last' (p = 1/3), its oldest block first ...
    assert p.pop_victim() == "mid"
    # ... until last blocks are seen never to come back while others do.
    q = ReuseAwarePolicy()
    for i in range(20):
        q.touch(f"x{i}", BlockHint(1))
        q.touch(f"x{i}", BlockHint(1))        # class 1 is read again
        q.touch(f"t{i}", BlockHint(2, last=True))
    q.touch("fresh", BlockHint(1))
    assert q.reuse_probability("last") == 1 / 22
    assert q.reuse_probability(1) == 21 / 23   # 20 of 21 first touches came back
    # Class 2 (x_i read twice, never a third time) and last blocks are both at p = 1/22: the
    # older of the two heads goes first; the fresh class-1 block outlives all 40 older ones.
    assert [q.pop_victim() for _ in range(4)] == ["x0", "t0", "x1", "t1"]
    for _ in range(36):
        q.pop_victim()
    assert len(q) == 1 and "fresh" in q


def test_reuse_aware_discard_and_make_policy() -> None:
    p = make_policy("reuse")
    p.touch("a", MID)
    p.discard("a")
    p.discard("never")
    assert len(p) == 0 and p.pop_victim() is None
    assert make_policy("lru").name == "lru"


def test_reuse_aware_beats_lru_on_a_scan_with_a_reused_prefix() -> None:
    """A shared 2-block prefix, then one-off tails: LRU loses the prefix to the scan."""
    prompts = [["p0", "p1", f"u{i}a", f"u{i}b"] for i in range(30)]
    assert hit_rate(LRUPolicy(), prompts, 3) == 0.0
    assert hit_rate(ReuseAwarePolicy(), prompts, 3) == 55 / 120  # 3 misses to learn
    assert belady_hit_rate(prompts, 3) == 58 / 120


def _touched(policy_name: str, many: bool) -> EvictionPolicy:
    """A policy after two prompts (sharing their first block) and a re-read, touched one key
    at a time or a prompt at a time."""
    p = make_policy(policy_name)
    for prompt in (["r", "a", "b"], ["r", "c", "d", "e"], ["a", "c"]):
        if many:
            p.touch_many(prompt, 0, len(prompt))
        else:
            for key, hint in hints(prompt):
                p.touch(key, hint)
    return p


@pytest.mark.parametrize("name", ["lru", "reuse"])
def test_touch_many_is_touch_key_by_key_and_victims_is_pops_order(name: str) -> None:
    p = _touched(name, many=False)
    order = list(p.victims())
    q = _touched(name, many=True)
    assert order == list(q.victims())
    if isinstance(p, ReuseAwarePolicy) and isinstance(q, ReuseAwarePolicy):
        for cls in ("first", "last", 1, 2):
            assert p.reuse_probability(cls) == q.reuse_probability(cls)
        assert p._seen == q._seen and p._gaps == q._gaps  # what it learned, exactly
    assert len(p) == 6 and list(p.victims()) == order  # nothing was evicted
    assert [p.pop_victim() for _ in range(7)] == [*order, None]
    expected = {"lru": ["b", "r", "d", "e", "a", "c"],
                # Prompts' last blocks (b, e, and c the last time: p = 1/5, never read
                # again) oldest first, then first blocks r, a (p = 2/5), then d (p = 3/5).
                "reuse": ["b", "e", "c", "r", "a", "d"]}
    assert order == expected[name]


def test_reuse_touch_many_learns_exactly_what_touch_does_with_ghosts_trimmed() -> None:
    rng = random.Random(5)
    prompts = [[f"b{rng.randrange(40)}" for _ in range(rng.randrange(1, 9))] for _ in range(60)]
    one, many = ReuseAwarePolicy(history=1), ReuseAwarePolicy(history=1)
    for prompt in prompts:
        for key, hint in hints(prompt):
            one.touch(key, hint)
        many.touch_many(prompt, 0, len(prompt))
        while len(one) > 12:  # evict alike, so the ghost list is trimmed as it fills
            assert one.pop_victim() == many.pop_victim()
    assert one._seen == many._seen and one._gaps == many._gaps
    assert list(one.victims()) == list(many.victims()) and len(one) == 12
