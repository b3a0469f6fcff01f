"""Which pool block to evict: LRU, a learned reuse-aware policy, and offline Belady for reference.

Pure code: no clock, no I/O. A policy keeps the set of resident keys and their order; whoever owns
the capacity (the kvstore master, the simulator) asks it for victims. Time is the policy's own
count of accesses, so the same code runs over a trace and in a live master.

`ReuseAwarePolicy` learns online, per class of block, how likely a block is to be read again
(`p`) and how long reuses take (one gap histogram). A block's class is what the pool knows when
it touches it: whether it is a prompt's final block (usually partial, so it is almost never
named again: the next turn extends it under a new hash), whether it is a prompt's first block
(shared by every prompt of a namespace) and how many times it has been seen. The victim is the
resident block least likely to be read again given how long it has already waited:
`p (1 - F(age)) / (1 - p F(age))`, the conditional probability of a future hit. Inside one class
that is monotone in age, so only the oldest block of each class is a candidate: an eviction
costs one look per class.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

Key = Hashable


@dataclass(frozen=True)
class BlockHint:
    """What the pool knows about a block when it is read or written."""

    depth: int = 0       # its index among the prompt's blocks
    last: bool = False   # the prompt's final block (the next turn names it anew)


class EvictionPolicy(Protocol):
    name: str

    def __contains__(self, key: Key) -> bool: ...
    def __len__(self) -> int: ...
    def touch(self, key: Key, hint: BlockHint) -> None:
        """The block was read or written: it is resident from now on."""
    def discard(self, key: Key) -> None:
        """The block left for another reason (removed, failed); unknown keys are ignored."""
    def pop_victim(self) -> Key | None:
        """Removes and returns the block to evict next; None when nothing is resident."""


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, key: Key, hint: BlockHint) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def discard(self, key: Key) -> None:
        self._order.pop(key, None)

    def pop_victim(self) -> Key | None:
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key


# Gap histogram: two buckets per doubling of the age (in accesses), enough for hours of traffic.
_GAP_BUCKETS = 64
MAX_SEEN_CLASS = 5


def _gap_bucket(age: int) -> int:
    return min(int(2 * math.log2(age + 1)), _GAP_BUCKETS - 1)


class ReuseAwarePolicy:
    """Learned, frequency- and prefix-aware eviction (see the module docstring).

    `history` bounds how many evicted keys keep their access count and class (a ghost list, as
    ARC and S3-FIFO keep), as a multiple of the resident set at its largest."""

    name = "reuse"

    def __init__(self, history: int = 32) -> None:
        self._history_factor = history
        self._clock = 0
        self._queues: dict[Hashable, OrderedDict[Key, int]] = {}
        self._resident: dict[Key, Hashable] = {}
        # Every key still remembered: (times seen, class of its last touch, time of it).
        self._seen: OrderedDict[Key, tuple[int, Hashable, int]] = OrderedDict()
        self._entered: dict[Hashable, int] = {}
        self._reused: dict[Hashable, int] = {}
        # Laplace-smoothed: one pseudo-observation in every bucket.
        self._gaps = [1] * _GAP_BUCKETS
        self._gaps_total = _GAP_BUCKETS
        self._cdf: list[float] | None = None
        self._peak = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    @staticmethod
    def block_class(seen: int, hint: BlockHint) -> Hashable:
        if hint.last:
            return "last"
        if hint.depth == 0:
            return "first"
        return min(seen, MAX_SEEN_CLASS)

    def reuse_probability(self, cls: Hashable) -> float:
        """How often a touch of this class was followed by another (learned, smoothed)."""
        return (self._reused.get(cls, 0) + 1) / (self._entered.get(cls, 0) + 2)

    def touch(self, key: Key, hint: BlockHint) -> None:
        self._clock += 1
        prior = self._seen.pop(key, None)
        seen = 1
        if prior is not None:
            count, cls, at = prior
            seen = count + 1
            self._reused[cls] = self._reused.get(cls, 0) + 1
            self._gaps[_gap_bucket(self._clock - at)] += 1
            self._gaps_total += 1
            self._cdf = None
        cls = self.block_class(seen, hint)
        self._entered[cls] = self._entered.get(cls, 0) + 1
        self._seen[key] = (seen, cls, self._clock)
        old = self._resident.get(key)
        if old is not None:
            del self._queues[old][key]
        self._queues.setdefault(cls, OrderedDict())[key] = self._clock
        self._resident[key] = cls
        self._peak = max(self._peak, len(self._resident))
        while len(self._seen) > max(self._history_factor * self._peak, 1):
            ghost = next(iter(self._seen))
            if ghost in self._resident:  # resident keys stay remembered
                self._seen.move_to_end(ghost)
                break
            del self._seen[ghost]

    def discard(self, key: Key) -> None:
        cls = self._resident.pop(key, None)
        if cls is not None:
            del self._queues[cls][key]

    def _survival(self, cls: Hashable, age: int) -> float:
        if self._cdf is None:
            run, cdf = 0, []
            for n in self._gaps:
                cdf.append(run / self._gaps_total)
                run += n
            self._cdf = cdf
        p = self.reuse_probability(cls)
        f = self._cdf[_gap_bucket(age)]
        return p * (1.0 - f) / (1.0 - p * f)

    def pop_victim(self) -> Key | None:
        best: tuple[float, int, Key] | None = None
        for cls, queue in self._queues.items():
            if not queue:
                continue
            key, at = next(iter(queue.items()))
            score = self._survival(cls, self._clock - at)
            # Ties go to the block touched longest ago: LRU among equals.
            if best is None or (score, at) < (best[0], best[1]):
                best = (score, at, key)
        if best is None:
            return None
        key = best[2]
        self.discard(key)
        return key


POLICIES = {"lru": LRUPolicy, "reuse": ReuseAwarePolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; one of {sorted(POLICIES)}") from None


def hints(blocks: Sequence[Key]) -> Iterable[tuple[Key, BlockHint]]:
    """Each block of one prompt with its hint."""
    last = len(blocks) - 1
    for i, key in enumerate(blocks):
        yield key, BlockHint(depth=i, last=i == last)


def hit_rate(policy: EvictionPolicy, prompts: Iterable[Sequence[Key]], capacity: int) -> float:
    """Fraction of blocks found resident, block by block in arrival order; a miss is inserted,
    then the policy evicts down to `capacity`."""
    assert capacity >= 1
    hits = total = 0
    for blocks in prompts:
        for key, hint in hints(blocks):
            total += 1
            hits += key in policy
            policy.touch(key, hint)
            while len(policy) > capacity:
                policy.pop_victim()
    return hits / total if total else 0.0


def belady_hit_rate(prompts: Iterable[Sequence[Key]], capacity: int) -> float:
    """The offline optimum (Belady's MIN): evict the block named again furthest in the future.
    A block never named again may be dropped at once (bypass), as MIN allows."""
    assert capacity >= 1
    keys = [k for blocks in prompts for k in blocks]
    never = len(keys)
    nxt = [never] * len(keys)
    upcoming: dict[Key, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = upcoming.get(keys[i], never)
        upcoming[keys[i]] = i
    resident: dict[Key, int] = {}
    heap: list[tuple[int, int]] = []  # (-next use, position of that use's key)
    hits = 0
    for i, key in enumerate(keys):
        hits += key in resident
        resident[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], i))
        while len(resident) > capacity:
            neg, at = heapq.heappop(heap)
            victim = keys[at]
            if resident.get(victim) == -neg:  # else a stale entry
                del resident[victim]
    return hits / len(keys) if keys else 0.0
