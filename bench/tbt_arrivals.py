"""Time between tokens of a stream that is generating, alone and while long prompts arrive:
(a) alone, the baseline, measured first in the same run; (b) while 2048-token prompts whose
blocks are in the pool arrive (decode pulls them beside its batch); (c) while new 1024-token
prompts arrive (the prefill engine computes them). Prints p50 / p90 / max and the ratio of each
to the baseline.

    .venv/bin/python bench/tbt_arrivals.py [--tokens 120]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_prefix import make_prompt, start_pantry  # noqa: E402

from pantry.cli.client_stream import stream_request  # noqa: E402
from pantry.cli.local_options import CPU_SPLITS, LocalOptions  # noqa: E402
from pantry.common.config_flags import default_of  # noqa: E402


def gaps_of(http: str, ids: list[int], tokens: int) -> list[float]:
    stamps: list[float] = []
    stream_request(http, "/v1/completions",
                   {"prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True},
                   on_text=lambda _t: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def arrivals(http: str, prompts: list[list[int]], stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        stream_request(http, "/v1/completions",
                       {"prompt": prompts[i % len(prompts)], "max_tokens": 1, "temperature": 0})
        i += 1


def summary(gaps: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(gaps, n=10)
    return statistics.median(gaps), qs[8], max(gaps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--cpu-split", choices=CPU_SPLITS,
                    default=default_of(LocalOptions, "cpu_split"), help="pantry local's")
    ns = ap.parse_args()
    rng = random.Random(time.time_ns())
    rows: list[tuple[str, tuple[float, float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="pantry-bench-") as tmp:
        proc, info = start_pantry(Path(tmp), 2300, "--cpu-split", ns.cpu_split)
        http = info["http"]
        try:
            cached = [make_prompt(rng, 2048) for _ in range(3)]
            for ids in cached:  # into the pool
                stream_request(http, "/v1/completions", {"prompt": ids, "max_tokens": 1})
            gaps_of(http, make_prompt(rng, 32), 8)  # warm-up
            phases: list[tuple[str, list[list[int]] | None]] = [
                ("alone (baseline)", None),
                ("2048-token pool hits arriving", cached),
                ("1024-token new prompts arriving", [make_prompt(rng, 1024) for _ in range(50)]),
            ]
            for name, load in phases:
                stop = threading.Event()
                worker: Any = None
                if load is not None:
                    worker = threading.Thread(target=arrivals, args=(http, load, stop))
                    worker.start()
                    time.sleep(0.5)
                gaps = gaps_of(http, make_prompt(rng, 64), ns.tokens)
                stop.set()
                if worker is not None:
                    worker.join()
                rows.append((name, summary(gaps)))
                print(f"  {name}: {len(gaps)} gaps", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    base = rows[0][1]
    print("\nTBT of one stream, SmolLM2-135M on this machine's CPU")
    print(f"{'while':<34} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'p90/base':>9}")
    for name, (p50, p90, worst) in rows:
        print(f"{name:<34} {p50 * 1000:>8.1f} {p90 * 1000:>8.1f} {worst * 1000:>8.1f} "
              f"{p90 / base[1]:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
