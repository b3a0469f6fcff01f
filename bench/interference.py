"""Decode interference: steady decoding streams while long (2k-4k-token) prompts arrive, SmolLM2
on this machine's CPUs, in three setups measured in the same run:

  colocated            one engine on every CPU computes each arriving prompt whole, in the same
                       step as the streams' next tokens (decode's own chunk set past the prompt)
  colocated, chunked   the same engine computing prompts 256 tokens per step between decode steps
  disaggregated        a prefill engine computes the prompts and stores their blocks; the decode
                       engine pulls them from the pool (pantry local's CPU split). As the
                       conductor routes them, the streams' own short prompts (at most
                       --decode-prefill-tokens, pantry local's default) go straight to decode

Every setup runs under `pantry local` (so the same processes, pool and CPU split); this script
drives the engines' gRPC APIs itself, as the conductor does: colocated setups send the prompt
straight to decode (the route the conductor takes when no prefill engine answers), the
disaggregated one calls prefill, then decode with the first token (for prompts longer than
--decode-prefill-tokens; 0 sends every prompt through prefill). Per setup it prints TBT
p50/p99/max of the steady streams while prompts arrive, TTFT p50/p99 of the arriving prompts,
and the streams' tok/s; a table and a PNG (TBT over time, one panel per setup).

Target (issue 8): disaggregated p99 TBT at most 1.5x its own p50.

Each round ends by measuring this machine's own floor for that ratio (bench/noise_floor.py): a
fixed piece of CPU work as long as the setup's TBT p50, timed over and over on every CPU at
once with nothing of Pantry's running. The `floor` column is its p99/p50 (the steadiest CPU's,
median over rounds): an engine's steps can be no steadier than that. `--floor-s 0` skips it.

    .venv/bin/python bench/interference.py [--quick] [--png bench/out/interference.png]

A/B of `pantry local` flags: `--variant NAME=FLAGS` (repeatable) runs every setup once per
variant, `--rounds N` repeats them all in turn (the order rotated each round, so no variant
always follows another); `--setups disaggregated` runs only that one. Rows pool every round's
gaps; with several rounds the p99/p50 column adds the median [min-max] of the rounds' own.

    .venv/bin/python bench/interference.py --quick --setups disaggregated --rounds 3 \
        --variant idle= --variant nice=--no-prefill-idle
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import noise_floor  # noqa: E402
from bench.noise_floor import percentile as pct  # noqa: E402
from pantry.cli.local_options import LocalOptions  # noqa: E402
from pantry.common.config_flags import default_of  # noqa: E402
from pantry.common.sampling import SamplingParams  # noqa: E402
from pantry.common.wire import sampling_to_proto  # noqa: E402
from pantry.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setup:
    key: str
    name: str
    disaggregated: bool
    decode_chunk_tokens: int


SETUPS = (
    Setup("colocated", "colocated", False, 8192),
    Setup("chunked", "colocated, chunked", False, 256),
    Setup("disaggregated", "disaggregated", True, 256),
)


@dataclass
class Run:
    stamps: list[list[float]] = field(default_factory=list)  # per stream request: token times
    ttfts: list[float] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)                  # first arrival .. last first token


def start_local(workdir: Path, setup: Setup, max_len: int, flags: list[str]
                ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    ready = workdir / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pantry", "local", "--model", "smollm2", "--http-port", "0",
         "--grpc-port", "0", "--max-model-len", str(max_len), "--ready-file", str(ready),
         "--log-dir", str(workdir / "logs"),
         "--decode-chunk-tokens", str(setup.decode_chunk_tokens), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"pantry local failed; logs in {workdir}/logs")
        time.sleep(0.2)
    roles = json.loads(ready.read_text())["roles"]
    return proc, {name: str(r["address"]) for name, r in roles.items()}


class Engines:
    def __init__(self, addresses: dict[str, str]) -> None:
        self._channels = [grpc.insecure_channel(addresses[r]) for r in ("prefill", "decode")]
        self.prefill = engine_pb2_grpc.PrefillEngineStub(self._channels[0])
        self.decode = engine_pb2_grpc.DecodeEngineStub(self._channels[1])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def generate(self, ids: list[int], max_tokens: int, disaggregated: bool,
                 on_token: list[float], rid: str) -> None:
        """Tokens of one request, their arrival times appended to `on_token` as they come.
        `disaggregated`: through prefill first (the caller applies the short-prompt route)."""
        sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                    ignore_eos=True))
        req = engine_pb2.DecodeRequest(request_id=rid, token_ids=ids, sampling=sampling)
        if disaggregated:
            first = self.prefill.Prefill(engine_pb2.PrefillRequest(
                request_id=rid, token_ids=ids, sampling=sampling), timeout=600)
            on_token.append(time.perf_counter())
            req.first_token = first.first_token
            if max_tokens == 1:
                return
        for chunk in self.decode.Decode(req, timeout=600):
            for _ in chunk.token_ids:
                on_token.append(time.perf_counter())


def measure(setup: Setup, flags: list[str], ns: argparse.Namespace, rng: random.Random) -> Run:
    run = Run()
    with tempfile.TemporaryDirectory(prefix="pantry-interference-") as tmp:
        proc, addresses = start_local(Path(tmp), setup, max(ns.lengths) + 64, flags)
        engines = Engines(addresses)
        try:
            # Warm-up: first-call costs belong to no setup.
            engines.generate([rng.randrange(1000, 40000) for _ in range(64)], 4,
                             setup.disaggregated, [], "warm")
            stop = threading.Event()

            def stream(i: int) -> None:
                while not stop.is_set():  # a stream that finishes starts the next at once
                    stamps: list[float] = []
                    run.stamps.append(stamps)
                    engines.generate([rng.randrange(1000, 40000) for _ in range(64)],
                                     ns.stream_tokens,
                                     setup.disaggregated and 64 > ns.decode_prefill_tokens,
                                     stamps, f"s{i}")

            threads = [threading.Thread(target=stream, args=(i,), daemon=True)
                       for i in range(ns.streams)]
            for t in threads:
                t.start()
            time.sleep(ns.settle_s)  # the streams reach their steady pace first
            start = time.perf_counter()
            arrivals: list[threading.Thread] = []
            for k in range(ns.prompts):
                ids = [rng.randrange(1000, 40000) for _ in range(rng.choice(ns.lengths))]

                def arrive(ids: list[int] = ids, k: int = k) -> None:
                    t0 = time.perf_counter()
                    got: list[float] = []
                    engines.generate(ids, ns.arrival_tokens,
                                     setup.disaggregated and len(ids) > ns.decode_prefill_tokens,
                                     got, f"p{k}")
                    run.ttfts.append(got[0] - t0)

                arrival = threading.Thread(target=arrive, daemon=True)
                arrival.start()
                arrivals.append(arrival)
                time.sleep(ns.interval_s)
            for arrival in arrivals:
                arrival.join()
            run.window = (start, time.perf_counter())
            stop.set()
            for t in threads:
                t.join(timeout=600)
        finally:
            engines.close()
            proc.terminate()
            proc.wait(timeout=60)
    return run


def gaps_in(run: Run) -> tuple[list[float], list[tuple[float, float]]]:
    """TBTs whose later token falls in the arrival window, and (time into it, gap) pairs."""
    lo, hi = run.window
    gaps: list[float] = []
    points: list[tuple[float, float]] = []
    for stamps in run.stamps:
        for a, b in zip(stamps, stamps[1:], strict=False):
            if lo <= b <= hi and b - a < 60:
                gaps.append(b - a)
                points.append((b - lo, b - a))
    return gaps, points


def pooled(runs: list[Run]) -> tuple[list[float], list[tuple[float, float]]]:
    """gaps_in over every round, concatenated."""
    gaps: list[float] = []
    points: list[tuple[float, float]] = []
    for run in runs:
        g, p = gaps_in(run)
        gaps += g
        points += p
    return gaps, points


def plot(results: dict[str, list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), sharex=True,
                             squeeze=False)
    for ax, (name, runs) in zip(axes[:, 0], results.items(), strict=True):
        _, points = pooled(runs)
        ax.plot([p[0] for p in points], [1000 * p[1] for p in points], ".", ms=3)
        ax.set_title(name)
        ax.set_ylabel("TBT ms")
        ax.set_yscale("log")
    axes[-1, 0].set_xlabel("seconds since the first long prompt arrived")
    fig.suptitle("Steady decode streams while 2k-4k-token prompts arrive (SmolLM2-135M, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="2 streams, 3 prompts of 2048 tokens: proves it works, in minutes")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 3072, 4096])
    ap.add_argument("--arrival-tokens", type=int, default=8,
                    help="tokens each arriving prompt generates (decode pulls or computes it)")
    ap.add_argument("--interval-s", type=float, default=4.0)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--png", type=Path, default=REPO / "bench/out/interference.png")
    ap.add_argument("--setups", nargs="+", default=[s.key for s in SETUPS],
                    choices=[s.key for s in SETUPS])
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=FLAGS: extra `pantry local` flags (repeatable; default: none)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--floor-s", type=float, default=20.0,
                    help="seconds of the machine's noise floor measured after each round "
                         "(0: none)")
    ap.add_argument("--decode-prefill-tokens", type=int,
                    default=default_of(LocalOptions, "decode_prefill_tokens"),
                    help="disaggregated: prompts up to this long go straight to decode, as the "
                         "conductor sends them (default: pantry local's)")
    ns = ap.parse_args()
    if ns.quick:
        ns.streams, ns.prompts, ns.lengths, ns.interval_s = 2, 3, [2048], 3.0
    variants = [(name, shlex.split(flags)) for name, _, flags in
                (spec.partition("=") for spec in ns.variant or ["="])]
    cells = [(setup, name, flags) for setup in SETUPS if setup.key in ns.setups
             for name, flags in variants]
    rng = random.Random(8)
    rounds: dict[str, list[Run]] = {}
    floors: list[dict[int, list[float]]] = []  # each round's noise-floor loop times
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(ns.rounds):
        for setup, name, flags in cells[r % len(cells):] + cells[: r % len(cells)]:
            label = f"{setup.name} {name}".strip()
            print(f"round {r + 1}: {label}: running", flush=True)
            rounds.setdefault(label, []).append(measure(setup, flags, ns, rng))
        if ns.floor_s > 0:
            print(f"round {r + 1}: the machine's noise floor: {ns.floor_s:.0f} s", flush=True)
            floors.append(noise_floor.sample(ns.floor_s))
    print(f"\n{ns.streams} streams decoding while {ns.prompts} prompts of "
          f"{'/'.join(map(str, ns.lengths))} tokens arrive every {ns.interval_s:.1f} s; "
          f"{ns.rounds} round(s); load average after: {os.getloadavg()[0]:.1f}")
    width = max(20, *map(len, rounds))
    print(f"{'setup':<{width}} {'TBT p50':>8} {'p99':>8} {'max':>8} {'p99/p50':>8} "
          f"{'floor':>6} {'TTFT p50':>9} {'p99':>8} {'tok/s':>7}  rounds' p99/p50")
    for label, runs in rounds.items():
        gaps, _ = pooled(runs)
        ttfts = [t for r in runs for t in r.ttfts]
        secs = sum(r.window[1] - r.window[0] for r in runs)
        p50, p99 = pct(gaps, 0.5), pct(gaps, 0.99)
        ratios = sorted(pct(g, 0.99) / pct(g, 0.5) for g in (gaps_in(r)[0] for r in runs))
        each = (f"{statistics.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]"
                if len(ratios) > 1 else "")
        found = [noise_floor.floor(f, p50) for f in floors]
        floor = f"{statistics.median(f.ratio for f in found):.2f}" if found else "-"
        print(f"{label:<{width}} {1000 * p50:>8.1f} {1000 * p99:>8.1f} {1000 * max(gaps):>8.1f} "
              f"{p99 / p50:>8.2f} {floor:>6} {statistics.median(ttfts):>9.2f} "
              f"{pct(ttfts, 0.99):>8.2f} {len(gaps) / secs:>7.1f}  {each}")
        for r, f in enumerate(found):
            print(f"    round {r + 1}: {f.describe()}")
    print("(TBT in ms, TTFT in s; tok/s: the streams' tokens inside the arrival window; floor: "
          "the machine's own p99/p50 for fixed work as long as TBT p50)")
    plot(rounds, ns.png)
    print(f"plot: {ns.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
