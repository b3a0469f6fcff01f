"""Issue #9's eviction target studied offline: how far online policies get towards Belady on the
conversation trace, and an upper bound on every policy that decides by a block's class and age.

    .venv/bin/python bench/eviction_study.py [--capacities 1000,10000] [--methods ...]

Hit rate is counted as `kvstore.eviction.hit_rate` counts it: block by block in arrival order, a
miss inserted, then evicted down to the capacity. Methods (all but `belady` and the bound's
ORACLE row are online, learning only from the past):

- `base`: LRU, the pool's `reuse` policy, Belady (MIN with bypass).
- `hawkeye`: OPTgen replays Belady on the past (an occupancy vector; exact MIN decisions, known
  when a block comes back or falls out of an 8x-capacity window) and trains a per-class friendly
  rate; averse blocks are evicted first (the newest: a bypass), LRU among the friendly, a
  friendly victim detrains its class.
- `mockingjay`: a per-class reuse distance (moving average; a block not back within 8x the
  capacity counts as 2x that); evict the block whose predicted next use is furthest from now,
  in the future or overdue.
- `bound`: for each class set, the most hits any policy can get that keeps a block of class c
  until it reaches an age A_c (LRU, LHD, TTLs, the `reuse` policy are such policies), with the
  classes' statistics taken from the whole trace (an oracle) and the capacity held on average
  rather than at every instant (a relaxation): an upper bound. Each class's (slot-time, hits)
  curve over A_c is made concave and its segments taken by density until the budget is spent.
- `hd`: the policy that reaches that bound: evict, among 64 sampled residents, the lowest hit
  density (hits per slot-time still to come, best over hold limits) for its class and age, with
  tables from the whole trace (oracle), from the first half frozen (scored on the second half,
  against LRU, `reuse` and Belady on the same half), or relearned online every 20k accesses.

Classes use what the pool knows when a block is touched: times seen, the conversation's turn
(a prompt whose first two or more blocks were seen continues the request that last held its
deepest seen block), blocks to the end of the prompt, whether the block is in the matched
prefix, the previous reuse gap. The trace gives every conversation its own second block and all
share block 0, so there is no application to learn from.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conductor.trace import read_trace  # noqa: E402
from kvstore.eviction import BlockHint, EvictionPolicy, make_policy  # noqa: E402

T = TypeVar("T")
TRACE = "/work/shared/traces/conversation_trace.jsonl"
# Hold limits and age buckets: four per doubling.
EDGES = np.array([0, *sorted({int(2 ** (x / 4)) for x in range(76)}), 10**9], dtype=np.int64)


@dataclass(frozen=True)
class Access:
    key: int
    depth: int      # index in its prompt
    blocks: int     # blocks in the prompt
    seen: int       # times seen before
    gap: int        # accesses since its previous access (0: first)
    matched: int    # leading blocks of the prompt seen before
    turn: int       # the conversation's turn (1: a new conversation)
    output: int     # the request's output tokens (not known on arrival)


def accesses(path: str) -> list[Access]:
    seen: dict[int, int] = {}
    last_at: dict[int, int] = {}
    owner: dict[int, int] = {}
    turns: list[int] = []
    out: list[Access] = []
    for r, req in enumerate(read_trace(path)):
        h = req.hash_ids
        m = 0
        while m < len(h) and h[m] in seen:
            m += 1
        parent = owner.get(h[m - 1]) if m >= 2 else None
        turns.append(turns[parent] + 1 if parent is not None else 1)
        for d, key in enumerate(h):
            t = len(out)
            out.append(Access(key, d, len(h), seen.get(key, 0), t - last_at.get(key, t), m,
                              turns[r], req.output_length))
            seen[key] = seen.get(key, 0) + 1
            last_at[key] = t
            owner[key] = r
    return out


def log_bucket(x: int) -> int:
    return 0 if x <= 0 else int(math.log2(x)) + 1


def base_class(a: Access) -> Hashable:
    return (min(a.seen, 6), min(a.turn, 8), log_bucket(a.blocks - 1 - a.depth),
            a.depth < a.matched)


CLASS_SETS: dict[str, Callable[[Access], Hashable]] = {
    "none (LRU's)": lambda a: 0,
    "seen, first, last (reuse's)": lambda a: (min(a.seen, 6), a.depth == 0,
                                              a.depth == a.blocks - 1),
    "seen, turn, to end, matched": base_class,
    "+ previous gap": lambda a: (base_class(a), log_bucket(a.gap)),
    "+ prompt length": lambda a: (base_class(a), log_bucket(a.gap), log_bucket(a.blocks)),
    "+ output length (not online)": lambda a: (base_class(a), log_bucket(a.gap),
                                               log_bucket(a.output)),
}


def class_ids(items: Iterable[T], of: Callable[[T], Hashable]) -> tuple[list[int], int]:
    ids: dict[Hashable, int] = {}
    return [ids.setdefault(of(x), len(ids)) for x in items], len(ids)


def next_uses(keys: Sequence[int]) -> tuple[list[int], list[int]]:
    n = len(keys)
    nxt, prev = [n] * n, [-1] * n
    last: dict[int, int] = {}
    for i, key in enumerate(keys):
        j = last.get(key)
        if j is not None:
            prev[i], nxt[j] = j, i
        last[key] = i
    return nxt, prev


def optgen(prev: Sequence[int], capacity: int) -> np.ndarray:
    """friendly[i]: MIN keeps access i's block until its next use. Decided in time order: the
    interval [prev, now) fits if the occupancy stays under the capacity all along it."""
    occupancy = np.zeros(len(prev) + 1, dtype=np.int32)
    friendly = np.zeros(len(prev), dtype=np.int8)
    for j, i in enumerate(prev):
        if i >= 0:
            run = occupancy[i:j]
            if run.max() < capacity:
                run += 1
                friendly[i] = 1
    return friendly


def policy_hits(policy: EvictionPolicy, acc: Sequence[Access], capacity: int,
                start: int = 0) -> float:
    hits = 0
    for i, a in enumerate(acc):
        hits += i >= start and a.key in policy
        policy.touch(a.key, BlockHint(depth=a.depth, last=a.depth == a.blocks - 1))
        while len(policy) > capacity:
            policy.pop_victim()
    return hits / (len(acc) - start)


def belady_hits(keys: Sequence[int], nxt: Sequence[int], capacity: int, start: int = 0) -> float:
    resident: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    hits = 0
    for i, key in enumerate(keys):
        hits += i >= start and key in resident
        resident[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], i))
        while len(resident) > capacity:
            neg, at = heapq.heappop(heap)
            if resident.get(keys[at]) == -neg:
                del resident[keys[at]]
    return hits / (len(keys) - start)


def hawkeye(keys: Sequence[int], prev: Sequence[int], nxt: Sequence[int], cls: Sequence[int],
            n_cls: int, capacity: int, window: int = 8) -> float:
    friendly_label = optgen(prev, capacity)  # read only once each label is known (see below)
    horizon = window * capacity
    good, total = np.ones(n_cls), np.full(n_cls, 2.0)
    friendly: OrderedDict[int, None] = OrderedDict()
    averse: OrderedDict[int, None] = OrderedDict()
    is_friendly: dict[int, bool] = {}
    cls_of: dict[int, int] = {}
    waiting: deque[int] = deque()
    hits = 0
    for j, key in enumerate(keys):
        while waiting and waiting[0] < j - horizon:
            i = waiting.popleft()
            if nxt[i] > i + horizon:  # not back within the window: averse, known now
                total[cls[i]] += 1
        i = prev[j]
        if i >= 0 and j - i <= horizon:  # the label of access i is known at its next use
            total[cls[i]] += 1
            good[cls[i]] += friendly_label[i]
        waiting.append(j)
        was = is_friendly.pop(key, None)
        if was is not None:
            hits += 1
            (friendly if was else averse).pop(key)
        now = bool(good[cls[j]] / total[cls[j]] >= 0.3)
        (friendly if now else averse)[key] = None
        is_friendly[key], cls_of[key] = now, cls[j]
        if len(is_friendly) > capacity:
            if averse:
                victim, _ = averse.popitem(last=True)
            else:
                victim, _ = friendly.popitem(last=False)
                total[cls_of[victim]] += 1  # detrain
            del is_friendly[victim]
    return hits / len(keys)


def mockingjay(keys: Sequence[int], prev: Sequence[int], nxt: Sequence[int],
               cls: Sequence[int], n_cls: int, capacity: int) -> float:
    horizon, never, alpha = 8 * capacity, 16.0 * capacity, 1 / 8
    predicted = np.full(n_cls, -1.0)

    def learn(c: int, distance: float) -> None:
        predicted[c] = distance if predicted[c] < 0 else predicted[c] + alpha * (
            distance - predicted[c])

    due: dict[int, float] = {}
    latest: list[tuple[float, int]] = []
    earliest: list[tuple[float, int]] = []
    waiting: deque[int] = deque()
    hits = 0
    for j, key in enumerate(keys):
        while waiting and waiting[0] < j - horizon:
            i = waiting.popleft()
            if nxt[i] > i + horizon:
                learn(cls[i], never)
        i = prev[j]
        if i >= 0 and j - i <= horizon:
            learn(cls[i], j - i)
        waiting.append(j)
        hits += key in due
        p = predicted[cls[j]]
        due[key] = d = j + (p if p >= 0 else horizon / 2)
        heapq.heappush(latest, (-d, key))
        heapq.heappush(earliest, (d, key))
        while len(due) > capacity:
            while due.get(latest[0][1]) != -latest[0][0]:
                heapq.heappop(latest)
            while due.get(earliest[0][1]) != earliest[0][0]:
                heapq.heappop(earliest)
            if -latest[0][0] - j >= j - earliest[0][0]:
                del due[heapq.heappop(latest)[1]]
            else:
                del due[heapq.heappop(earliest)[1]]
        if len(latest) > 8 * capacity:  # drop stale heap entries
            latest = [(-d, k) for k, d in due.items()]
            earliest = [(d, k) for k, d in due.items()]
            heapq.heapify(latest)
            heapq.heapify(earliest)
    return hits / len(keys)


def _per_class(nxt: Sequence[int], cls: Sequence[int], n_cls: int, lo: int,
               hi: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Reuse distances of accesses lo..hi-1 by class, and the ages their dead ones reach."""
    reused: list[list[int]] = [[] for _ in range(n_cls)]
    dead: list[list[int]] = [[] for _ in range(n_cls)]
    for i in range(lo, hi):
        if nxt[i] < hi:
            reused[cls[i]].append(nxt[i] - i)
        else:
            dead[cls[i]].append(hi - i)
    return ([np.sort(np.array(r, dtype=np.int64)) for r in reused],
            [np.array(d, dtype=np.int64) for d in dead])


def class_age_bound(nxt: Sequence[int], cls: Sequence[int], n_cls: int,
                    capacities: Sequence[int]) -> list[float]:
    n = len(nxt)
    reused, dead = _per_class(nxt, cls, n_cls, 0, n)
    segments: list[tuple[float, float, float]] = []  # (density, slot-time, hits)
    for d, e in zip(reused, dead, strict=True):
        cumulative = np.concatenate([[0], np.cumsum(d)])
        hull = [(0.0, 0.0)]
        for limit in EDGES[1:-1]:
            k = int(np.searchsorted(d, limit, side="right"))
            cost = float(cumulative[k] + (len(d) - k) * limit + np.minimum(e, limit).sum())
            point = (cost, float(k))
            if cost <= hull[-1][0]:
                continue
            while len(hull) >= 2:  # keep the curve concave
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (cost - x1) > (k - y1) * (x2 - x1):
                    break
                hull.pop()
            hull.append(point)
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            if y2 > y1:
                segments.append(((y2 - y1) / (x2 - x1), x2 - x1, y2 - y1))
    segments.sort(reverse=True)
    rates = []
    for capacity in capacities:
        budget, hits = float(capacity * n), 0.0
        for _, cost, gained in segments:
            if budget <= 0:
                break
            part = min(1.0, budget / cost)
            hits += gained * part
            budget -= cost * part
        rates.append(hits / n)
    return rates


def hit_density_tables(nxt: Sequence[int], cls: Sequence[int], n_cls: int, lo: int,
                       hi: int) -> np.ndarray:
    """table[c, b]: for a block of class c at the age EDGES[b], the most hits per slot-time
    still to come over every hold limit (a block still away at `hi` counts as never back)."""
    reused, dead = _per_class(nxt, cls, n_cls, lo, hi)
    n_b = len(EDGES) - 1
    table = np.zeros((n_cls, n_b))
    for c in range(n_cls):
        d = reused[c]
        every = np.sort(np.concatenate([d, np.full(len(dead[c]), 10**8, dtype=np.int64)]))
        cumulative = np.concatenate([[0], np.cumsum(every)])
        hits_to = np.searchsorted(d, EDGES, side="right")
        all_to = np.searchsorted(every, EDGES, side="right")
        for b in range(n_b - 1):
            g, later = EDGES[b], np.arange(b + 1, n_b)
            hits = hits_to[later] - hits_to[b]
            k0, k1 = all_to[b], all_to[later]
            cost = (cumulative[k1] - cumulative[k0] - (k1 - k0) * g
                    + (len(every) - k1) * (EDGES[later] - g))
            table[c, b] = float(np.max(np.where(cost > 0, hits / np.maximum(cost, 1), 0.0)))
    return table


def hit_density_policy(keys: Sequence[int], cls: Sequence[int], capacity: int,
                       table_at: Callable[[int], np.ndarray], refresh: int = 0,
                       start: int = 0, samples: int = 64) -> float:
    rng = random.Random(1)
    touched: dict[int, int] = {}
    cls_of: dict[int, int] = {}
    resident: list[int] = []
    slot: dict[int, int] = {}
    table = table_at(0)
    hits = 0
    for j, key in enumerate(keys):
        if refresh and j and j % refresh == 0:
            table = table_at(j)
        if key in touched:
            hits += j >= start
        else:
            slot[key] = len(resident)
            resident.append(key)
        touched[key], cls_of[key] = j, cls[j]
        if len(resident) > capacity:
            best: tuple[tuple[float, int], int] | None = None
            for _ in range(samples):
                k = resident[rng.randrange(len(resident))]
                age = j - touched[k]
                b = int(np.searchsorted(EDGES, age, side="right")) - 1
                score = (float(table[cls_of[k], b]), -age)  # ties: the oldest
                if best is None or score < best[0]:
                    best = (score, k)
            assert best is not None
            victim = best[1]
            i, moved = slot.pop(victim), resident.pop()
            if moved != victim:
                resident[i], slot[moved] = moved, i
            del touched[victim], cls_of[victim]
    return hits / (len(keys) - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--capacities", default="1000,10000")
    parser.add_argument("--methods", default="base,hawkeye,mockingjay,bound,hd")
    args = parser.parse_args()
    caps = [int(c) for c in args.capacities.split(",")]
    methods = set(args.methods.split(","))
    acc = accesses(args.trace)
    keys = [a.key for a in acc]
    nxt, prev = next_uses(keys)
    n, half = len(keys), len(keys) // 2
    cls, n_cls = class_ids(acc, base_class)
    print(f"{n} block accesses; capacities {caps}; classes {n_cls} (seen, turn, to end, matched)")

    def row(name: str, rates: Sequence[float], started: float) -> None:
        print(f"{name:<44}" + "".join(f"{r:>8.4f}" for r in rates)
              + f"   ({time.perf_counter() - started:.0f} s)", flush=True)

    if "base" in methods:
        for name in ("lru", "reuse"):
            t = time.perf_counter()
            row(name, [policy_hits(make_policy(name), acc, c) for c in caps], t)
        t = time.perf_counter()
        row("belady", [belady_hits(keys, nxt, c) for c in caps], t)
    if "hawkeye" in methods:
        t = time.perf_counter()
        row("hawkeye (OPTgen)", [hawkeye(keys, prev, nxt, cls, n_cls, c) for c in caps], t)
    if "mockingjay" in methods:
        t = time.perf_counter()
        row("mockingjay", [mockingjay(keys, prev, nxt, cls, n_cls, c) for c in caps], t)
    if "bound" in methods:
        for name, of in CLASS_SETS.items():
            t = time.perf_counter()
            c_ids, count = class_ids(acc, of)
            row(f"bound: {name}", class_age_bound(nxt, c_ids, count, caps), t)
        # ORACLE: whether the request's conversation goes on (its last full block comes back).
        goes_on: list[bool] = []
        for i, a in enumerate(acc):
            end = i - a.depth + a.blocks
            goes_on.append(a.blocks >= 2 and nxt[end - 2] < n)
        t = time.perf_counter()
        c_ids, count = class_ids(range(n), lambda i: (goes_on[i], base_class(acc[i])))
        row("bound: ORACLE goes on + seen, turn, ...", class_age_bound(nxt, c_ids, count, caps),
            t)
    if "hd" in methods:
        t = time.perf_counter()
        full = hit_density_tables(nxt, cls, n_cls, 0, n)
        row("hit density, oracle tables", [hit_density_policy(keys, cls, c, lambda j: full)
                                           for c in caps], t)

        def learned(j: int) -> np.ndarray:
            if j == 0:
                return np.ones((n_cls, len(EDGES) - 1))
            return hit_density_tables(nxt, cls, n_cls, 0, j)

        t = time.perf_counter()
        row("hit density, online (relearned every 20k)",
            [hit_density_policy(keys, cls, c, learned, refresh=20_000) for c in caps], t)
        print("second half only (the first half warms the cache):")
        first = hit_density_tables(nxt, cls, n_cls, 0, half)
        t = time.perf_counter()
        row("  lru", [policy_hits(make_policy("lru"), acc, c, half) for c in caps], t)
        t = time.perf_counter()
        row("  reuse", [policy_hits(make_policy("reuse"), acc, c, half) for c in caps], t)
        t = time.perf_counter()
        row("  hit density, first half's tables frozen",
            [hit_density_policy(keys, cls, c, lambda j: first, start=half) for c in caps], t)
        t = time.perf_counter()
        row("  belady", [belady_hits(keys, nxt, c, half) for c in caps], t)


if __name__ == "__main__":
    main()
