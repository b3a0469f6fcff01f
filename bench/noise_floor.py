"""The machine's own floor for a time-between-tokens ratio: how much the same piece of CPU work
varies in time here, with nothing of Pantry's running.

A decode step is a fixed amount of work, so its TBT p99/p50 can be no steadier than the machine
that runs it. On a shared VM it may be far from steady: a vCPU whose host core is busy with
another tenant's thread runs everything, interpreter and kernels alike, up to twice as slowly,
and the guest sees no steal time for it. This measures that floor in the same run as the
benchmark it sits beside: one pinned process per CPU (every CPU busy, as while prefill and
decode both compute) times a fixed pure-Python loop of ~2 ms, again and again; consecutive
loops are then summed into pieces as long as the benchmark's TBT p50, whose p99/p50 is the
floor for that benchmark's own.

    .venv/bin/python bench/noise_floor.py [--seconds 20] [--piece-ms 33]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

LOOP = 20_000  # iterations of one timed loop: ~2 ms on this machine's CPUs

_CHILD = """
import json, os, sys, time
os.sched_setaffinity(0, {{{cpu}}})
end = time.perf_counter() + {seconds}
out = []
while True:
    t0 = time.perf_counter()
    x = 0
    for i in range({loop}):
        x += i * i
    t1 = time.perf_counter()
    out.append(t1 - t0)
    if t1 > end:
        break
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class Floor:
    """Pieces of fixed work as long as `piece_s`: their p50 and p99 (seconds) on each CPU."""

    piece_s: float
    by_cpu: dict[int, tuple[float, float]]

    @property
    def ratio(self) -> float:
        """The steadiest CPU's p99/p50: the floor no engine on this machine gets below."""
        return min(p99 / p50 for p50, p99 in self.by_cpu.values())

    def describe(self) -> str:
        each = ", ".join(f"CPU {cpu} {p99 / p50:.2f}" for cpu, (p50, p99)
                         in sorted(self.by_cpu.items()))
        return (f"fixed work in pieces of {1000 * self.piece_s:.1f} ms, every CPU busy: "
                f"p99/p50 {each}")


def sample(seconds: float) -> dict[int, list[float]]:
    """Each CPU's loop times, every CPU timing at once for `seconds`."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = {cpu: subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(cpu=cpu, seconds=seconds, loop=LOOP)],
        stdout=subprocess.PIPE) for cpu in cpus}
    out: dict[int, list[float]] = {}
    for cpu, proc in procs.items():
        stdout, _ = proc.communicate(timeout=seconds + 60)
        assert proc.returncode == 0, f"noise probe on CPU {cpu} exited {proc.returncode}"
        out[cpu] = json.loads(stdout)
    return out


def pieces(loops: list[float], piece_s: float) -> list[float]:
    """Consecutive loops summed into pieces of about `piece_s` (at least one loop each)."""
    k = max(1, round(piece_s / statistics.median(loops)))
    return [sum(loops[i : i + k]) for i in range(0, len(loops) - k + 1, k)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def floor(samples: dict[int, list[float]], piece_s: float) -> Floor:
    by_cpu = {}
    for cpu, loops in samples.items():
        p = pieces(loops, piece_s)
        by_cpu[cpu] = (percentile(p, 0.5), percentile(p, 0.99))
    return Floor(piece_s, by_cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--piece-ms", type=float, default=33.0,
                    help="length of one piece of work (a decode step's TBT p50)")
    ns = ap.parse_args()
    began = time.perf_counter()
    found = floor(sample(ns.seconds), ns.piece_ms / 1000)
    print(f"{found.describe()} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
