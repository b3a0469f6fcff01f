"""TTFT of vLLM-CPU instance B on prompts instance A computed, from Pantry's pool, against B
computing them cold and against A's own local prefix-cache hit, all in the same run.

Real processes: a kvstore master and node, vLLM-CPU A and B (SmolLM2-135M float32, block 32,
torch.compile on, both started at once), each with PantryConnector. Per length and repetition:

  cold   B serves a fresh prompt nobody has seen: every token computed
  local  A serves prompt P twice; the second is A's own local prefix-cache hit
  pool   B serves P: B never saw it, so its blocks come from the pool (A stored them)

TTFT is the time to the first streamed token (`/v1/completions`, stream, temperature 0).
Median of --reps. The last line is one JSON object.

Each timed request starts with both instances idle for SETTLE_S: after each step a vLLM-CPU
worker keeps spinning on its step queue (sched_yield) for a second (vLLM's shm_broadcast
busy_loop_s). On one machine shared by A and B, A's spin stole B's cores: B's pool hit, sent
right after A's local hit, ran its forward 2 to 4 times slower than the same forward a second
later (0.5 to 0.9 s added, whatever the prompt length: the "fixed cost" of the first
measurements). Instances on their own cores never see it.

    .venv/bin/python bench/vllm_pool.py [--lengths 512 1024 2048] [--reps 3] [--eager]

--eager skips torch.compile (start-up in seconds, not minutes, and slower forwards: every TTFT
grows, the pool's share of a hit shrinks): for a loaded machine, where compiling two instances
at once can run past vLLM's start-up timeouts. The targets are stated for compiled instances.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvstore.client import KVStoreClient  # noqa: E402
from tests.vllm.vllm_rig import (  # noqa: E402
    BLOCK,
    VllmServer,
    running_pool,
    start_vllm,
    vllm_missing,
    wait_ready,
)


def ttft(server: VllmServer, prompt: list[int]) -> float:
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                       "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    for raw in resp:
        line = raw.decode().strip()
        if first is None and line.startswith("data: {"):
            first = time.perf_counter() - start
    conn.close()
    assert first is not None, "no token streamed"
    return first


# Longer than vLLM's busy_loop_s (1 s): the other instance's worker has stopped spinning.
SETTLE_S = 1.5


def timed(server: VllmServer, prompt: list[int]) -> float:
    time.sleep(SETTLE_S)
    return ttft(server, prompt)


def wait_stored(client: KVStoreClient, count: int) -> None:
    deadline = time.monotonic() + 120
    while client.status().objects < count:
        if time.monotonic() > deadline:
            raise TimeoutError("A's saves did not reach the pool")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="vLLM with --enforce-eager")
    args = ap.parse_args()
    missing = vllm_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, 45000) for _ in range(n)]

    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_pool(Path(tmp), dram="2GiB") as pool:
        a = start_vllm(pool.address, Path(tmp), "a", enforce_eager=args.eager)
        b = start_vllm(pool.address, Path(tmp), "b", enforce_eager=args.eager)
        client = KVStoreClient(pool.address, host_id="bench")
        try:
            wait_ready(a)
            wait_ready(b)
            ttft(a, fresh(64))  # first requests pay one-off costs; not measured
            ttft(b, fresh(64))
            for n in args.lengths:
                cold, local, hit = [], [], []
                for _ in range(args.reps):
                    cold.append(timed(b, fresh(n)))
                    prompt = fresh(n)
                    stored = client.status().objects
                    ttft(a, prompt)
                    wait_stored(client, stored + n // BLOCK)
                    local.append(timed(a, prompt))
                    hit.append(timed(b, prompt))
                results[n] = {"cold_ms": 1000 * statistics.median(cold),
                              "local_ms": 1000 * statistics.median(local),
                              "pool_ms": 1000 * statistics.median(hit)}
        finally:
            client.close()
            a.stop()
            b.stop()

    print(f"{'tokens':>7} {'B cold ms':>10} {'A local hit ms':>15} {'B pool hit ms':>14} "
          f"{'pool/cold':>10} {'pool/local':>11}")
    for n, r in results.items():
        print(f"{n:>7} {r['cold_ms']:>10.1f} {r['local_ms']:>15.1f} {r['pool_ms']:>14.1f} "
              f"{r['pool_ms'] / r['cold_ms']:>10.3f} {r['pool_ms'] / r['local_ms']:>11.2f}")
    summary: dict[str, object] = {
        f"{k}_{n}": round(v, 1) for n, r in results.items() for k, v in r.items()}
    summary["eager"] = args.eager
    last = max(results)
    summary[f"hit_vs_cold_{last}"] = round(results[last]["pool_ms"] / results[last]["cold_ms"], 3)
    summary[f"hit_vs_local_{last}"] = round(
        results[last]["pool_ms"] / results[last]["local_ms"], 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
