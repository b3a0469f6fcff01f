"""engine.cpu_fused_ops against torch's ops, alternated in one run (OMP_WAIT_POLICY=PASSIVE, as
the engines run, set here before torch loads):

  * per call, on SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 + 3 heads of 64): the
    residual add + RMSNorm, silu(gate) * up, the rotary on the QKV output, at each row count;
  * a whole SmolLM2 step through the engine's ModelRunner: a cold prefill of each --prefill
    length, and decode steps of 1 and 8 streams (bench/decode_throughput.py's loop).

    .venv/bin/python bench/fused_ops.py [--threads 2] [--rows 1 8 512 2048]
        [--prefill 512 1024 2048] [--streams 1 8] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_throughput import decode_rate  # noqa: E402
from engine import cpu_fused_ops  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.rope import apply_rotary, rotary_factors  # noqa: E402
from engine.runner import ModelRunner, SeqStep  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, DIM = 576, 1536, 9, 3, 64


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def per_call(rows: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median us per call, kernel and torch, alternated `repeats` times."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen)
    delta = torch.randn(rows, HIDDEN, generator=gen)
    weight = torch.randn(HIDDEN, generator=gen)
    gate_up = torch.randn(rows, 2 * INTER, generator=gen)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * DIM, generator=gen)
    angles = torch.randn(rows, DIM // 2, generator=gen) * 30
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = rotary_factors(emb.cos(), emb.sin(), torch.float32)
    qk = qkv[:, : (HEADS + KV_HEADS) * DIM].view(rows, HEADS + KV_HEADS, DIM)
    calls = max(20, 20000 // rows)

    def torch_norm() -> object:
        s = x + delta
        return F.rms_norm(s, (HIDDEN,), weight, 1e-5)

    def torch_silu() -> object:
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u

    ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        # the kernel adds into x in place: x grows by delta each call, harmless for a timing
        "add_rms_norm": (lambda: cpu_fused_ops.add_rms_norm(x, delta, weight, 1e-5), torch_norm),
        "silu_mul": (lambda: cpu_fused_ops.silu_mul(gate_up), torch_silu),
        "rotary": (lambda: cpu_fused_ops.rotary_(qk, cos, sin),
                   lambda: apply_rotary(qk, cos, sin)),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (kernel, reference) in ops.items():
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(_per_call_us(kernel, calls))
            theirs.append(_per_call_us(reference, calls))
        out[name] = {"kernel_us": statistics.median(ours), "torch_us": statistics.median(theirs)}
    return out


def prefill_ms(runner: ModelRunner, tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    ids = tuple(rng.randrange(1000, 40000) for _ in range(tokens))
    table = runner.allocator.allocate(-(-tokens // runner.block_size))
    try:
        start = time.perf_counter()
        runner.step([SeqStep(ids, 0, tuple(table))])
        return (time.perf_counter() - start) * 1e3
    finally:
        runner.allocator.free(table)


def alternated(measure: Callable[[int], float], repeats: int) -> dict[str, float]:
    """measure(seed) with the kernels on and off, alternated; the medians (each run printed)."""
    on: list[float] = []
    off: list[float] = []
    for i in range(repeats):
        for enabled, into in ((True, on), (False, off)):
            cpu_fused_ops.set_enabled(enabled)
            into.append(measure(i))
    cpu_fused_ops.set_enabled(True)
    print(f"  kernel {[round(v, 1) for v in on]}, torch {[round(v, 1) for v in off]}",
          flush=True)
    return {"kernel": statistics.median(on), "torch": statistics.median(off)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 512, 2048])
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_fused_ops.available():
        raise SystemExit(f"fused ops unavailable: {cpu_fused_ops.unavailable_reason()}")
    results: dict[str, object] = {"threads": args.threads}
    for rows in args.rows:
        figures = per_call(rows, args.repeats)
        results[f"per_call_rows_{rows}"] = figures
        print(f"rows {rows}: " + ", ".join(
            f"{k} {v['kernel_us']:.1f} vs {v['torch_us']:.1f} us" for k, v in figures.items()),
            flush=True)
    if args.prefill or args.streams:
        runner = ModelRunner(load_model("smollm2"), num_blocks=max(
            [-(-t // 16) for t in args.prefill] + [1])
            + max(args.streams + [1]) * -(-(args.context + args.steps + 1) // 16) + 8)
        with torch.inference_mode():
            prefill_ms(runner, 64, 0)  # warm: kernels built, pool started
        for tokens in args.prefill:
            def prefill(seed: int, t: int = tokens) -> float:
                return prefill_ms(runner, t, seed)
            figures_ms = alternated(prefill, args.repeats)
            results[f"prefill_{tokens}_ms"] = figures_ms
            print(f"prefill {tokens}: kernel {figures_ms['kernel']:.0f} ms, torch "
                  f"{figures_ms['torch']:.0f} ms", flush=True)
        for streams in args.streams:
            def decode(seed: int, s: int = streams) -> float:
                return decode_rate(runner, s, args.context, args.steps, seed)
            rate = alternated(decode, args.repeats)
            results[f"decode_{streams}_tok_s"] = rate
            print(f"decode {streams} streams: kernel {rate['kernel']:.1f} tok/s, torch "
                  f"{rate['torch']:.1f} tok/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
