"""Decode tokens per second of SmolLM2-135M (float32, CPU) through the engine's ModelRunner, at 1
and 8 streams, measured in the same run against two baselines:

  * the per-sequence torch reference attention (`reference_paged_attention`) against the
    batched one the engine uses, in this process on the same loaded model;
  * the few-row linears on our thread pool computed from the GGUF file's quantized weights
    (engine.cpu_quant_linear, the engine's default), from a float32 copy
    (engine.cpu_linear_pool), and oneDNN for every input, in this process on the same loaded
    model, alternated;
  * with `--baseline-tree DIR` (a checkout of an earlier commit, e.g. `git archive HEAD`), that
    tree's whole engine (its model, attention and matmuls), in a subprocess, alternating with
    this tree's, so both see the same machine.

    .venv/bin/python bench/decode_throughput.py [--context 256] [--steps 48] [--streams 1 8]
        [--threads 1] [--baseline-tree /tmp/head]
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
from collections.abc import Callable
from pathlib import Path

import torch

from engine import cpu_linear_pool, cpu_pool, cpu_quant_linear
from engine.loader import load_model
from engine.packed_linear import PackedLinear
from engine.runner import ModelRunner, SeqStep

HERE = Path(__file__).resolve()


def decode_rate(runner: ModelRunner, streams: int, context: int, steps: int, seed: int,
                sync: Callable[[], None] = lambda: None) -> float:
    """Tokens per second over `steps` greedy decode steps of `streams` sequences together.
    `sync`: waits for the device before the clock starts (`torch.cuda.synchronize` on a GPU)."""
    rng = random.Random(seed)
    bs = runner.block_size
    tokens = [[rng.randrange(1000, 40000) for _ in range(context)] for _ in range(streams)]
    tables = [runner.allocator.allocate(-(-(context + steps + 1) // bs)) for _ in range(streams)]
    try:
        runner.step([SeqStep(tuple(t), 0, tuple(b)) for t, b in zip(tokens, tables, strict=True)])
        lens = [context] * streams
        last = [t[-1] for t in tokens]
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            logits = runner.step([SeqStep((tok,), n, tuple(b))
                                  for tok, n, b in zip(last, lens, tables, strict=True)])
            last = logits.argmax(-1).tolist()
            lens = [n + 1 for n in lens]
        return streams * steps / (time.perf_counter() - start)
    finally:
        for table in tables:
            runner.allocator.free(table)


def measure(ns: argparse.Namespace, attention_fns: dict[str, object]) -> dict[str, float]:
    """{"<name> <streams>": tok/s}; an empty `attention_fns` runs the tree's own default."""
    runner = ModelRunner(load_model("smollm2"), num_blocks=max(ns.streams) * (
        -(-(ns.context + ns.steps) // 16) + 2))
    model_cls = type(runner.model)
    default_fn = model_cls.__dict__["attention_fn"]  # the staticmethod itself, to put back
    rates: dict[str, float] = {}
    try:
        decode_rate(runner, 1, 32, 4, seed=0)  # warm-up: first-call costs are not decode
        for streams in ns.streams:
            for name, fn in (attention_fns or {"engine": None}).items():
                if fn is not None:
                    model_cls.attention_fn = staticmethod(fn)  # type: ignore[assignment, arg-type]
                rates[f"{name} {streams}"] = statistics.median(
                    decode_rate(runner, streams, ns.context, ns.steps, seed=rep)
                    for rep in range(ns.reps))
                model_cls.attention_fn = default_fn
    finally:
        model_cls.attention_fn = default_fn
    return rates


LINEARS = ("oneDNN", "float32 pool", "quantized pool")


def measure_linears(ns: argparse.Namespace) -> dict[str, float]:
    """{"<LINEARS entry> <streams>": tok/s}: each decode run with the linears' quantized pool
    copies, their float32 ones (from a second load of the model), then none (oneDNN for every
    input), alternated, medians."""
    runner = ModelRunner(load_model("smollm2"), num_blocks=max(ns.streams) * (
        -(-(ns.context + ns.steps) // 16) + 2))
    linears = [m for m in runner.model.modules() if isinstance(m, PackedLinear)]
    copies = {"quantized pool": [m.few_rows for m in linears], "oneDNN": [None] * len(linears),
              "float32 pool": [m.few_rows for m in load_model("smollm2", quantized=False)
                               .model.modules() if isinstance(m, PackedLinear)]}
    quantized = sum(isinstance(c, cpu_quant_linear.QuantWeight)
                    for c in copies["quantized pool"])
    print(f"{quantized} of {len(linears)} linears have quantized pool copies")
    runs: dict[str, list[float]] = {}
    try:
        decode_rate(runner, 1, 32, 4, seed=0)
        for streams in ns.streams:
            for rep in range(ns.reps):
                for name in LINEARS:
                    for m, copy in zip(linears, copies[name], strict=True):
                        m.few_rows = copy
                    runs.setdefault(f"{name} {streams}", []).append(
                        decode_rate(runner, streams, ns.context, ns.steps, seed=rep))
    finally:
        for m, copy in zip(linears, copies["quantized pool"], strict=True):
            m.few_rows = copy
    return {key: statistics.median(rates) for key, rates in runs.items()}


def print_against(kind: str, names: tuple[str, ...], rates: dict[str, float],
                  streams: list[int]) -> None:
    """A table of `rates` ({"<name> <streams>": tok/s}), each against the first name's."""
    print(f"{kind:<26} {'streams':>7} {'tok/s':>9} {'vs ' + names[0].split()[0]:>13}")
    for n in streams:
        base = rates[f"{names[0]} {n}"]
        for name in names:
            rate = rates[f"{name} {n}"]
            print(f"{name:<26} {n:>7} {rate:>9.1f} {rate / base:>12.2f}x")


def in_subprocess(tree: Path, ns: argparse.Namespace) -> dict[str, float]:
    """This tree's default engine path measured by the code in `tree`."""
    args = [sys.executable, str(HERE), "--worker", "--context", str(ns.context), "--steps",
            str(ns.steps), "--reps", str(ns.reps), "--threads", str(ns.threads), "--streams",
            *map(str, ns.streams)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the worker in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (pantry local gives decode one pinned core); 0 = default")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="an earlier checkout whose engine is measured alternately with this one")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.worker:
        print(json.dumps(measure(ns, {})))
        return 0
    print(f"SmolLM2-135M float32, {torch.get_num_threads()} torch threads, context "
          f"{ns.context}, {ns.steps} decode steps, median of {ns.reps}")
    if ns.baseline_tree is not None:
        this_tree = HERE.parent.parent
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
        for _ in range(2):  # alternated, so a busy spell on a shared machine hits both
            runs["baseline"].append(in_subprocess(ns.baseline_tree.resolve(), ns))
            runs["this"].append(in_subprocess(this_tree, ns))
        print(f"\nwhole engine: {ns.baseline_tree} (baseline) vs this tree, best of 2 runs")
        print(f"{'streams':>7} {'baseline tok/s':>15} {'this tok/s':>11} {'ratio':>7}")
        for streams in ns.streams:
            base = max(r[f"engine {streams}"] for r in runs["baseline"])
            this = max(r[f"engine {streams}"] for r in runs["this"])
            print(f"{streams:>7} {base:>15.1f} {this:>11.1f} {this / base:>6.2f}x")
    from engine import attention

    rates = measure(ns, {"reference (per sequence)": attention.reference_paged_attention,
                         "batched": attention.batched_paged_attention})
    print("\nattention only, this tree, same process")
    print_against("attention", ("reference (per sequence)", "batched"), rates, ns.streams)
    if cpu_linear_pool.available():
        rates = measure_linears(ns)
        print(f"\nfew-row linears (<= {cpu_linear_pool.MAX_ROWS} rows), this tree, same process, "
              f"alternated ({cpu_pool.threads()} pool threads)")
        print_against("linears", LINEARS, rates, ns.streams)
    else:
        print(f"\nno linear pool: {cpu_linear_pool.unavailable_reason()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
