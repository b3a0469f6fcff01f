"""What made decode's tokens late, from a step trace (engine/step_trace.py): a table of the slow
steps by cause, where they fell against prefill's passes, and a PNG over time.

    pantry local --decode-step-trace T --prefill-step-trace T ...   # or bench/interference.py
        --variant "traced=--decode-step-trace T --prefill-step-trace T"
    .venv/bin/python bench/step_trace_report.py T [--png bench/out/steps.png]

A decode step is slow when its wall time is over `--slow` (1.5) times the median of the steady
steps (no prompt tokens in the batch). Each slow step is put under the first cause that fits:

  prompt        the batch computed prompt tokens (a prompt computed by decode itself)
  waited        the loop was runnable but not running (`runq_ms`), or off its CPU for other
                reasons (wall - cpu - runq: the GIL, a lock), over `--wait-ms` (5)
  pull          a prompt was being pulled from the pool beside the step
  long context  the batch's context per sequence was over twice the steady steps' median
  slower CPU    none of those: the same work took more CPU time (a busy host, shared caches)

Counted by steps and by tokens (a step's sequences: each got its token late). With a prefill
pass trace in the same file, it also gives the share of slow steps within `--near-s` (0.5 s) of
a pass's end against the share of all steps.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CAUSES = ("prompt", "waited", "pull", "long context", "slower CPU")


@dataclass(frozen=True)
class Step:
    t: float
    wall_ms: float
    cpu_ms: float
    runq_ms: float
    sequences: int
    tokens: int
    positions: int
    pulling: int


def load(path: Path) -> tuple[list[Step], list[dict[str, Any]]]:
    """Decode steps (every decode engine's) and prefill passes, in file order."""
    steps: list[Step] = []
    passes: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "pulling" in row:
            steps.append(Step(row["t"], row["wall_ms"], row["cpu_ms"], row.get("runq_ms", 0.0),
                              row["sequences"], row["tokens"], row["positions"],
                              row["pulling"]))
        elif "stored" in row:
            passes.append(row)
    return steps, passes


def classify(steps: list[Step], slow: float, wait_ms: float) -> dict[Step, str]:
    """Each slow step's cause (module docstring)."""
    steady = [s for s in steps if s.tokens == s.sequences]
    p50 = statistics.median(s.wall_ms for s in steady)
    context = statistics.median(s.positions / s.sequences for s in steady)
    causes: dict[Step, str] = {}
    for s in steps:
        if s.wall_ms <= slow * p50:
            continue
        if s.tokens > s.sequences:
            causes[s] = "prompt"
        elif s.runq_ms > wait_ms or s.wall_ms - s.cpu_ms - s.runq_ms > wait_ms:
            causes[s] = "waited"
        elif s.pulling:
            causes[s] = "pull"
        elif s.positions / s.sequences > 2 * context:
            causes[s] = "long context"
        else:
            causes[s] = "slower CPU"
    return causes


def near_pass_ends(steps: list[Step], passes: list[dict[str, Any]], near_s: float) -> float:
    """The share of `steps` starting within `near_s` of a prefill pass's end."""
    ends = sorted(p["t"] + p["wall_ms"] / 1000 for p in passes)
    if not ends or not steps:
        return 0.0
    hits = 0
    for s in steps:
        i = bisect.bisect_left(ends, s.t)
        hits += any(abs(s.t - ends[j]) < near_s for j in (i - 1, i) if 0 <= j < len(ends))
    return hits / len(steps)


def plot(steps: list[Step], passes: list[dict[str, Any]], causes: dict[Step, str],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min([s.t for s in steps] + [p["t"] for p in passes])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    fast = [s for s in steps if s not in causes]
    top.plot([s.t - t0 for s in fast], [s.wall_ms for s in fast], ".", ms=2, color="0.6",
             label="on time")
    for cause in CAUSES:
        late = [s for s, c in causes.items() if c == cause]
        if late:
            top.plot([s.t - t0 for s in late], [s.wall_ms for s in late], "o", ms=3,
                     label=f"{cause} ({len(late)})")
    for p in passes:  # prefill's passes as bands, so slow steps can be read against them
        top.axvspan(p["t"] - t0, p["t"] - t0 + p["wall_ms"] / 1000, color="tab:orange",
                    alpha=0.08)
        top.axvline(p["t"] - t0 + p["wall_ms"] / 1000, color="tab:orange", lw=0.5, alpha=0.5)
    top.set_yscale("log")
    top.set_ylabel("decode step wall ms")
    top.legend(loc="upper right", fontsize=8)
    top.set_title("Decode steps by cause; prefill passes shaded, their ends marked")
    bottom.plot([s.t - t0 for s in steps], [s.runq_ms for s in steps], ".", ms=2)
    bottom.set_ylabel("run queue ms")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--slow", type=float, default=1.5, help="slow: wall over this x median")
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--near-s", type=float, default=0.5)
    ap.add_argument("--png", type=Path, default=None)
    ns = ap.parse_args()
    steps, passes = load(ns.trace)
    if not any(s.tokens == s.sequences for s in steps):
        print(f"{ns.trace}: no decode steps without prompt tokens", file=sys.stderr)
        return 1
    causes = classify(steps, ns.slow, ns.wait_ms)
    tokens = sum(s.sequences for s in steps)
    steady = statistics.median(s.wall_ms for s in steps if s.tokens == s.sequences)
    print(f"{len(steps)} decode steps, {tokens} tokens; steady steps' median {steady:.1f} ms; "
          f"slow: over {ns.slow:g}x that ({ns.slow * steady:.1f} ms)")
    print(f"{'cause':<14} {'steps':>6} {'tokens':>7} {'of all tokens':>14}")
    for cause in CAUSES:
        late = [s for s, c in causes.items() if c == cause]
        n = sum(s.sequences for s in late)
        print(f"{cause:<14} {len(late):>6} {n:>7} {100 * n / tokens:>13.2f}%")
    n = sum(s.sequences for s in causes)
    print(f"{'all slow':<14} {len(causes):>6} {n:>7} {100 * n / tokens:>13.2f}%   "
          "(p99 stays under the threshold only below 1%)")
    if passes:
        print(f"\n{len(passes)} prefill passes, median {statistics.median(p['wall_ms'] for p in passes) / 1000:.1f} s; "  # noqa: E501
              f"steps within {ns.near_s:g} s of a pass's end: slow "
              f"{100 * near_pass_ends(list(causes), passes, ns.near_s):.1f}%, all "
              f"{100 * near_pass_ends(steps, passes, ns.near_s):.1f}%")
    if ns.png is not None:
        plot(steps, passes, causes, ns.png)
        print(f"plot: {ns.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
