"""TTFT of SmolLM2 prompts cold (prefill computes everything) versus a pool hit (the same prompt
again: its blocks come from the pool and prefill is skipped), both measured in the same run
against the same running Pantry. Prints the table and the hit/cold ratio; writes a PNG if
matplotlib is installed.

    .venv/bin/python bench/ttft_prefix.py [--lengths 512 1024 2048] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pantry.cli.client_stream import stream_request
from pantry.cli.local_options import CPU_SPLITS, LocalOptions
from pantry.common.config_flags import default_of

TARGET_RATIO_2048 = 0.2


def start_pantry(workdir: Path, max_len: int, *extra: str, model: str = "smollm2"
                 ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    ready = workdir / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pantry", "local", "--model", model, "--http-port", "0",
         "--grpc-port", "0", "--max-model-len", str(max_len), "--ready-file", str(ready),
         "--log-dir", str(workdir / "logs"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"pantry local failed; logs in {workdir}/logs")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def make_prompt(rng: random.Random, length: int) -> list[int]:
    # Ordinary vocabulary ids (above the special tokens), unique per call: never cached before.
    return [rng.randrange(1000, 40000) for _ in range(length)]


def ttft(http: str, ids: list[int]) -> tuple[float, int]:
    res = stream_request(http, "/v1/completions",
                         {"prompt": ids, "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    return res.ttft_s, int(res.usage["prompt_tokens_details"]["cached_tokens"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--png", default="bench/out/ttft_prefix.png")
    ap.add_argument("--cpu-split", choices=CPU_SPLITS,
                    default=default_of(LocalOptions, "cpu_split"), help="pantry local's")
    ns = ap.parse_args()
    rng = random.Random(time.time_ns())
    rows = []
    with tempfile.TemporaryDirectory(prefix="pantry-bench-") as tmp:
        proc, info = start_pantry(Path(tmp), max(ns.lengths) + 64, "--cpu-split", ns.cpu_split)
        http = info["http"]
        try:
            ttft(http, make_prompt(rng, 64))  # warm-up: first-call costs are not prefill
            for length in ns.lengths:
                cold, hit, cached = [], [], 0
                for rep in range(ns.reps):
                    ids = make_prompt(rng, length)
                    c, cached_cold = ttft(http, ids)
                    h, cached = ttft(http, ids)
                    assert cached_cold == 0, "a fresh prompt must not hit the pool"
                    cold.append(c)
                    hit.append(h)
                    print(f"  {length:5d} tokens rep {rep + 1}: cold {c * 1000:8.1f} ms, "
                          f"hit {h * 1000:7.1f} ms ({cached} cached)", flush=True)
                rows.append((length, statistics.median(cold), statistics.median(hit), cached))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"\nTTFT, SmolLM2-135M on this machine's CPU (median of {ns.reps})")
    print(f"{'prompt':>7} {'cold ms':>10} {'hit ms':>9} {'cached':>7} {'hit/cold':>9}")
    for length, c, h, cached in rows:
        print(f"{length:>7} {c * 1000:>10.1f} {h * 1000:>9.1f} {cached:>7} {h / c:>9.3f}")
    verdict = [r for r in rows if r[0] == 2048]
    if verdict:
        ratio = verdict[0][2] / verdict[0][1]
        print(f"target: hit at 2048 tokens <= {TARGET_RATIO_2048}x cold: "
              f"{'met' if ratio <= TARGET_RATIO_2048 else 'MISSED'} ({ratio:.3f}x)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    Path(ns.png).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [str(r[0]) for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r[1] * 1000 for r in rows], 0.4, label="cold")
    ax.bar([i + 0.2 for i in range(len(rows))], [r[2] * 1000 for r in rows], 0.4,
           label="pool hit")
    ax.set_xticks(range(len(rows)), xs)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("SmolLM2-135M TTFT: cold vs pool hit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ns.png)
    print(f"wrote {ns.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
