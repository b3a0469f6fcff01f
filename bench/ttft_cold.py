"""Cold TTFT of SmolLM2 through the whole path (`pantry local`, HTTP, conductor, prefill), split
into the time the prefill engine spent (from its log: before its first pass, in passes) and the
rest (HTTP, tokenizing, the conductor's prefix match, gRPC, the stream back).

Several variants (each its own `pantry local` with extra flags) run side by side and take turns,
request by request, so each sees the same machine; an idle one costs nothing (its OpenMP threads
sleep). Every prompt is fresh random token ids: nothing is cached anywhere.

    .venv/bin/python bench/ttft_cold.py [--lengths 512 1024 2048] [--reps 3]
        [--variant default=] [--variant pinned='--cpu-split pin'] [--variant t1='--threads 1']
        [--variant head@/tmp/head=]   # NAME@DIR: the tree at DIR (e.g. `git archive HEAD`)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_prefix import make_prompt, ttft  # noqa: E402

# The prefill engine's per-prompt log line (prefill.engine.PrefillEngine._finish).
ENGINE_LINE = re.compile(r"prefill \S+: (\d+) tokens.*; ([\d.]+) ms in the engine: ([\d.]+) ms "
                         r"before its first pass, ([\d.]+) ms in passes")


@dataclass
class Variant:
    name: str
    args: list[str]
    workdir: Path
    tree: Path  # the source tree its processes run
    proc: subprocess.Popen[bytes] | None = None
    http: str = ""
    client_ms: dict[int, list[float]] = field(default_factory=dict)

    def engine_ms(self) -> dict[int, list[tuple[float, float, float]]]:
        """Per prompt length: (in the engine, before the first pass, in passes) per request,
        in the order sent (the warm-up's line comes first and is left out)."""
        text = (self.workdir / "logs" / "prefill.log").read_text()
        out: dict[int, list[tuple[float, float, float]]] = {}
        for m in list(ENGINE_LINE.finditer(text))[1:]:
            out.setdefault(int(m[1]), []).append((float(m[2]), float(m[3]), float(m[4])))
        return out


def start_pantry(v: Variant, max_len: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`pantry local` from the variant's tree (`python -m` imports from the working directory,
    and every role it starts inherits it)."""
    ready = v.workdir / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pantry", "local", "--model", "smollm2", "--http-port", "0",
         "--grpc-port", "0", "--max-model-len", str(max_len), "--ready-file", str(ready),
         "--log-dir", str(v.workdir / "logs"), *v.args],
        cwd=v.tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"pantry local ({v.name}) failed; logs in {v.workdir}/logs")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=FLAGS: a `pantry local` started with FLAGS (repeatable)")
    ns = ap.parse_args()
    specs = ns.variant or ["default="]
    rng = random.Random(time.time_ns())
    with tempfile.TemporaryDirectory(prefix="pantry-ttft-") as tmp:
        variants = []
        for spec in specs:
            label, _, flags = spec.partition("=")
            name, _, tree = label.partition("@")
            workdir = Path(tmp) / name
            workdir.mkdir()
            variants.append(Variant(name, shlex.split(flags), workdir,
                                    Path(tree or Path(__file__).resolve().parent.parent)))
        try:
            for v in variants:
                v.proc, info = start_pantry(v, max(ns.lengths) + 64)
                v.http = info["http"]
                ttft(v.http, make_prompt(rng, 64))  # warm-up: first-call costs are not prefill
            for rep in range(ns.reps):
                for length in ns.lengths:
                    # Each rep rotates who goes first, so no variant always follows another.
                    turn = variants[rep % len(variants):] + variants[: rep % len(variants)]
                    for v in turn:
                        seconds, cached = ttft(v.http, make_prompt(rng, length))
                        assert cached == 0, "a fresh prompt must not hit the pool"
                        v.client_ms.setdefault(length, []).append(seconds * 1e3)
                        print(f"  rep {rep + 1} {length:5d} tokens {v.name:>12}: "
                              f"{seconds * 1e3:8.1f} ms", flush=True)
        finally:
            for v in variants:
                if v.proc is not None:
                    v.proc.send_signal(signal.SIGTERM)
            for v in variants:
                if v.proc is not None:
                    v.proc.wait(timeout=60)
        print(f"\nCold TTFT, SmolLM2-135M, median [min-max] of {ns.reps} (ms)")
        print(f"{'variant':>12} {'tokens':>6} {'client TTFT':>20} {'prefill engine':>20} "
              f"{'before 1st pass':>20} {'in passes':>20} {'outside engine':>20}")
        for v in variants:
            engine = v.engine_ms()
            for length in ns.lengths:
                client = v.client_ms[length]
                rows = engine.get(length, [])
                if len(rows) != len(client):
                    print(f"{v.name:>12} {length:>6} {spread(client):>20}  (engine log has "
                          f"{len(rows)} lines for {len(client)} requests)")
                    continue
                print(f"{v.name:>12} {length:>6} {spread(client):>20} "
                      f"{spread([r[0] for r in rows]):>20} {spread([r[1] for r in rows]):>20} "
                      f"{spread([r[2] for r in rows]):>20} "
                      f"{spread([c - r[0] for c, r in zip(client, rows, strict=True)]):>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
