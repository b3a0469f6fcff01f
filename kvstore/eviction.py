"""Which pool block to evict: LRU, a learned reuse-aware policy, and offline Belady for reference.

Pure code: no clock, no I/O. A policy keeps the set of resident keys and their order; whoever owns
the capacity (the kvstore master, the simulator) asks it for victims. Time is the policy's own
count of accesses, so the same code runs over a trace and in a live master.

The simulator evicts with `pop_victim`. The master cannot take the first victim blindly (a leased
object, or one on a page that cannot be freed, must be skipped), so it reads `victims()`, the
same order without evicting, and discards what it evicted. It touches the blocks of a prefix
match with one `touch_many` call: thousands of keys at C speed for LRU.

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
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

Key = Hashable


@dataclass(frozen=True)
class BlockHint:
    """What the pool knows about a block when it is read or written."""

    depth: int = 0       # its index among the prompt's blocks
    last: bool = False   # the prompt's final block (the next turn names it anew)


# A block whose place in its prompt is unknown (a put or a read outside a prefix match).
MIDDLE = BlockHint(depth=1)


class EvictionPolicy(Protocol):
    name: str
    # Whether `touch` looks at its hint: the master only keeps hints for policies that do.
    uses_hints: bool

    def __contains__(self, key: Key) -> bool: ...
    def __len__(self) -> int: ...
    def touch(self, key: Key, hint: BlockHint) -> None:
        """The block was read or written: it is resident from now on."""
    def discard(self, key: Key) -> None:
        """The block left for another reason (removed, failed); unknown keys are ignored."""
    def touch_many(self, keys: Sequence[Key], depth: int = 0, blocks: int = 0) -> None:
        """`touch` of each of `keys` in order: consecutive blocks of one prompt, the first at
        index `depth`, of `blocks` in all (0: unknown, so none is known to be the last)."""
    def pop_victim(self) -> Key | None:
        """Removes and returns the block to evict next; None when nothing is resident."""
    def victims(self) -> Iterator[Key]:
        """Every resident block in the order `pop_victim` would evict them, evicting none
        (valid until the next touch or discard)."""


def prompt_hints(n: int, depth: int, blocks: int) -> Iterator[BlockHint]:
    """The hints of `n` consecutive blocks of a prompt of `blocks` blocks (0: unknown), the
    first at index `depth`."""
    for i in range(depth, depth + n):
        yield BlockHint(depth=i, last=i == blocks - 1)


class LRUPolicy:
    name = "lru"
    uses_hints = False

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

    def touch_many(self, keys: Sequence[Key], depth: int = 0, blocks: int = 0) -> None:
        order = self._order
        try:  # the usual case in the master: every key is resident
            deque(map(order.move_to_end, keys), maxlen=0)
        except KeyError:
            order.update(dict.fromkeys(keys))  # new keys join at the end, in order
            deque(map(order.move_to_end, keys), maxlen=0)  # then all move there, in order

    def pop_victim(self) -> Key | None:
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key

    def victims(self) -> Iterator[Key]:
        return iter(self._order)


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
    uses_hints = True

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

    def touch_many(self, keys: Sequence[Key], depth: int = 0, blocks: int = 0) -> None:
        # `touch` of each key with its prompt hint, inlined: a prefix match touches thousands.
        seen_of, queues, resident = self._seen, self._queues, self._resident
        entered, reused, gaps = self._entered, self._reused, self._gaps
        clock, last = self._clock, blocks - 1
        for i, key in enumerate(keys, depth):
            clock += 1
            prior = seen_of.pop(key, None)
            seen = 1
            if prior is not None:
                count, prior_cls, at = prior
                seen = count + 1
                reused[prior_cls] = reused.get(prior_cls, 0) + 1
                gaps[_gap_bucket(clock - at)] += 1
                self._gaps_total += 1
                self._cdf = None
            cls: Hashable = ("last" if i == last else "first" if i == 0
                             else min(seen, MAX_SEEN_CLASS))  # block_class
            entered[cls] = entered.get(cls, 0) + 1
            seen_of[key] = (seen, cls, clock)
            old = resident.get(key)
            if old is not None:
                del queues[old][key]
            queue = queues.get(cls)
            if queue is None:
                queue = queues[cls] = OrderedDict()
            queue[key] = clock
            resident[key] = cls
            if len(resident) > self._peak:
                self._peak = len(resident)
            bound = max(self._history_factor * self._peak, 1)
            while len(seen_of) > bound:
                ghost = next(iter(seen_of))
                if ghost in resident:  # resident keys stay remembered
                    seen_of.move_to_end(ghost)
                    break
                del seen_of[ghost]
        self._clock = clock

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

    def victims(self) -> Iterator[Key]:
        # Each class's queue is already in the order pop_victim takes it (its oldest block
        # scores lowest, and the scores do not change while nothing is touched): merging the
        # queues by (score, time of touch) gives pop_victim's order without popping.
        def scored(cls: Hashable, queue: OrderedDict[Key, int]) -> Iterator[tuple[float, int,
                                                                                   Key]]:
            for key, at in queue.items():
                yield self._survival(cls, self._clock - at), at, key

        for _, _, key in heapq.merge(*(scored(c, q) for c, q in self._queues.items())):
            yield key


POLICIES: dict[str, type[LRUPolicy] | type[ReuseAwarePolicy]] = {
    "lru": LRUPolicy, "reuse": ReuseAwarePolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
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
