"""How to split a small machine's CPUs between a prefill and a decode engine (issue 8).

Each engine is a process of its own, as under `pantry local`, running SmolLM2-135M (float32)
through the engine's ModelRunner. For every setup it measures, in the same run:

  * prefill alone: one cold prompt of 512 and 2048 tokens (the other engine idle);
  * decode alone: tok/s at 1 and 8 streams (the other engine idle);
  * both at once: 8 streams decoding while 2048-token prompts are prefilled back to back:
    decode TBT p50/p99 inside that window and the prefill time.

Setups:
  pinned       prefill on CPU 0, decode on CPU 1, one torch thread each (the old default)
  shared       no pinning, every engine one torch thread per CPU, OpenMP's default (spinning) waits
  passive      as shared, OMP_WAIT_POLICY=PASSIVE: an engine waiting at a barrier sleeps
  nice         as passive, prefill at nice +10: decode's steps take the CPUs first when both run
  idle         as passive, prefill under SCHED_IDLE: it computes only on cycles nobody else wants
  spin         as nice, but a waiting thread spins briefly (GOMP_SPINCOUNT=20000) before it sleeps
  split-wait   prefill as nice, decode as spin. On a machine with nothing else running, decode
               alone is faster than under nice (no thread to wake per parallel region); but
               with prefill or any other process computing, its spinning team waits on a
               preempted thread and TBT triples, hence not `pantry local`'s default

    .venv/bin/python bench/cpu_split.py [--setups pinned passive nice] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


@dataclass(frozen=True)
class Setup:
    name: str
    pin: bool
    passive: bool
    prefill_nice: int = 0
    spincount: int = 0  # GOMP_SPINCOUNT: a waiting thread spins this long, then sleeps
    decode_spins: bool = False  # decode spins (spincount) while prefill waits passively
    prefill_idle: bool = False  # prefill under SCHED_IDLE


SETUPS = {
    "pinned": Setup("pinned", pin=True, passive=False),
    "shared": Setup("shared", pin=False, passive=False),
    "passive": Setup("passive", pin=False, passive=True),
    "nice": Setup("nice", pin=False, passive=True, prefill_nice=10),
    "idle": Setup("idle", pin=False, passive=True, prefill_nice=10, prefill_idle=True),
    "spin": Setup("spin", pin=False, passive=False, prefill_nice=10, spincount=20000),
    "split-wait": Setup("split-wait", pin=False, passive=True, prefill_nice=10,
                        spincount=20000, decode_spins=True),
}


# ---- the worker processes -------------------------------------------------------------------
def worker(ns: argparse.Namespace) -> int:
    import torch

    from engine.loader import load_model
    from engine.runner import ModelRunner, SeqStep

    if ns.cpus:
        os.sched_setaffinity(0, [int(c) for c in ns.cpus.split(",")])
    if ns.nice:
        os.nice(ns.nice)
    if ns.idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    torch.set_num_threads(ns.threads)
    runner = ModelRunner(load_model("smollm2"), num_blocks=8 * 40 + 2 * 130)
    rng = random.Random(0)
    bs = runner.block_size

    def prefill(n: int) -> float:
        ids = tuple(rng.randrange(1000, 40000) for _ in range(n))
        table = runner.allocator.allocate(-(-n // bs))
        try:
            start = time.perf_counter()
            for pos in range(0, n, 512):
                runner.step([SeqStep(ids[pos:pos + 512], pos, tuple(table))])
            return time.perf_counter() - start
        finally:
            runner.allocator.free(table)

    def decode(streams: int, seconds: float, steps: int = 0, stop: str = ""
               ) -> list[tuple[float, float]]:
        """(end time, seconds) of every decode step of `streams` sequences of 256 tokens."""
        ctx = 256
        tables = [runner.allocator.allocate(40) for _ in range(streams)]
        toks = [tuple(rng.randrange(1000, 40000) for _ in range(ctx)) for _ in range(streams)]
        try:
            runner.step([SeqStep(t, 0, tuple(b)) for t, b in zip(toks, tables, strict=True)])
            until = time.monotonic() + seconds
            if stop:
                print("filled", flush=True)  # the other engine's work starts now
            lens, last = [ctx] * streams, [t[-1] for t in toks]
            out: list[tuple[float, float]] = []
            while (time.monotonic() < until if not steps else len(out) < steps):
                if stop and os.path.exists(stop):
                    break
                t0 = time.perf_counter()
                logits = runner.step([SeqStep((tok,), n, tuple(b))
                                      for tok, n, b in zip(last, lens, tables, strict=True)])
                last = logits.argmax(-1).tolist()
                out.append((time.monotonic(), time.perf_counter() - t0))
                # Wrap before the 40 blocks run out; the cost of a step barely moves.
                lens = [n + 1 if n + 1 < 40 * bs else ctx for n in lens]
            return out
        finally:
            for table in tables:
                runner.allocator.free(table)

    prefill(64)  # warm-up: first-call costs are not what is measured
    decode(2, 0, steps=3)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        result: object
        if cmd["op"] == "prefill":
            timed = []
            for _ in range(cmd["reps"]):
                seconds = prefill(cmd["tokens"])
                timed.append((time.monotonic(), seconds))  # (end time, seconds)
            result = timed
        elif cmd["op"] == "decode":
            result = decode(cmd["streams"], cmd["seconds"], stop=cmd.get("stop", ""))
        else:
            return 0
        print(json.dumps(result), flush=True)
    return 0


class Worker:
    def __init__(self, role: str, setup: Setup) -> None:
        ncpu = len(os.sched_getaffinity(0))
        cpus = sorted(os.sched_getaffinity(0))
        args = [sys.executable, str(HERE), "--worker"]
        if setup.pin:
            half = cpus[: ncpu // 2] if role == "prefill" else cpus[ncpu // 2:]
            args += ["--cpus", ",".join(map(str, half)), "--threads", str(len(half))]
        else:
            args += ["--threads", str(ncpu)]
        if role == "prefill" and setup.prefill_nice:
            args += ["--nice", str(setup.prefill_nice)]
        if role == "prefill" and setup.prefill_idle:
            args += ["--idle"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        spins = role == "decode" if setup.decode_spins else not setup.passive
        if setup.passive and not spins:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if setup.spincount and spins:
            env["GOMP_SPINCOUNT"] = str(setup.spincount)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"worker failed to start: {line!r}")

    def send(self, cmd: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self) -> list[list[float]]:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.send({"op": "quit"})
        self.proc.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(setup: Setup, reps: int, decode_s: float) -> dict[str, float]:
    pre, dec = Worker("prefill", setup), Worker("decode", setup)
    try:
        pre.wait_ready()
        dec.wait_ready()
        out: dict[str, float] = {}
        for n in (512, 2048):
            pre.send({"op": "prefill", "tokens": n, "reps": reps})
            out[f"prefill {n} ms"] = 1000 * min(s for _, s in pre.result())
        for streams in (1, 8):
            dec.send({"op": "decode", "streams": streams, "seconds": decode_s})
            steps = [s for _, s in dec.result()]
            out[f"decode {streams} tok/s"] = streams * len(steps) / sum(steps)
        # Both at once: decode runs through the whole window; prompts start a moment in.
        stop = Path(f"/tmp/cpu_split_stop_{os.getpid()}")
        stop.unlink(missing_ok=True)
        dec.send({"op": "decode", "streams": 8, "seconds": 600.0, "stop": str(stop)})
        assert dec.proc.stdout is not None
        assert dec.proc.stdout.readline().strip() == "filled"
        start = time.monotonic()
        pre.send({"op": "prefill", "tokens": 2048, "reps": reps})
        prefills = pre.result()
        stop.touch()
        stepped = dec.result()
        stop.unlink(missing_ok=True)
        window = [s for t, s in stepped if start < t - s and t < prefills[-1][0]]
        out["both: prefill 2048 ms"] = 1000 * statistics.median(s for _, s in prefills)
        out["both: decode TBT p50 ms"] = 1000 * pct(window, 0.5)
        out["both: decode TBT p99 ms"] = 1000 * pct(window, 0.99)
        out["both: decode 8 tok/s"] = 8 * len(window) / sum(window)
        return out
    finally:
        for w in (pre, dec):
            w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        return worker(ns)
    reps, decode_s = (1, 2.0) if ns.quick else (3, 5.0)
    print(f"SmolLM2-135M float32, {len(os.sched_getaffinity(0))} CPUs, best of {reps} prefills, "
          f"{decode_s:.0f} s of decode per figure; load average {os.getloadavg()[0]:.1f}")
    results = {name: measure(SETUPS[name], reps, decode_s) for name in ns.setups}
    names = list(next(iter(results.values())))
    print(f"{'':<26}" + "".join(f"{n:>10}" for n in results))
    for row in names:
        print(f"{row:<26}" + "".join(f"{r[row]:>10.1f}" for r in results.values()))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
