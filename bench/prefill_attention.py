"""The C prefill attention kernel (engine/cpu_prefill_attention.py) against the torch paths it
replaces, on SmolLM2-135M's shapes (9 query heads, 3 KV heads, head size 64), float32.

Per call (one layer), each pair alternated in one run, best and median of --reps:
  causal T       T new tokens, no cache: torch's SDPA(is_causal, enable_gqa) vs the kernel
  prefix C+T     T new tokens after C cached: `_lone_prefill` (two flash calls merged by
                 log-sum-exp) vs the kernel
  ragged         several sequences in one step: the masked SDPA over gathered keys vs the kernel
Whole step (--step): a cold T-token prefill through the real model and ModelRunner, the kernel
switched on and off between steps (`engine.cpu_prefill_attention.supports` patched).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/prefill_attention.py [--threads 2] [--step]
        [--step-reps 5] [--no-call]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import attention, cpu_pool, cpu_prefill_attention  # noqa: E402
from engine.attention import batched_paged_attention  # noqa: E402
from engine.attention_batch import AttentionBatch  # noqa: E402
from engine.kv_cache import PagedKVCache  # noqa: E402

HEADS, KV_HEADS, HD, BLOCK = 9, 3, 64, 16


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternated(reps: int, first: Callable[[], float], second: Callable[[], float]
                ) -> tuple[list[float], list[float]]:
    """Seconds of each, measured in turn `reps` times after one warm call each."""
    first(), second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(reps):
        a.append(first())
        b.append(second())
    return a, b


def _pair(name: str, torch_fn: Callable[[], object], kernel_fn: Callable[[], object],
          reps: int) -> None:
    a, b = _alternated(reps, lambda: _timed(torch_fn), lambda: _timed(kernel_fn))
    ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
    print(f"{name:<22} torch {min(a) * 1e3:7.2f} / {ta:7.2f} ms   kernel {min(b) * 1e3:7.2f} / "
          f"{tb:7.2f} ms   (best / median)   x{ta / tb:.2f}", flush=True)


def _step(query_lens: list[int], context_lens: list[int]
          ) -> tuple[AttentionBatch, PagedKVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks = sum(-(-(q + c) // BLOCK) for q, c in zip(query_lens, context_lens, strict=True))
    kv = PagedKVCache(1, blocks + 1, BLOCK, KV_HEADS, HD, torch.float32)
    kv.blocks.normal_()
    free = list(range(blocks + 1))
    random.Random(0).shuffle(free)
    tables = [[free.pop() for _ in range(-(-(q + c) // BLOCK))]
              for q, c in zip(query_lens, context_lens, strict=True)]
    batch = AttentionBatch.build(query_lens, context_lens, tables, BLOCK)
    t = sum(query_lens)
    return (batch, kv, torch.randn(t, HEADS, HD), torch.randn(t, KV_HEADS, HD),
            torch.randn(t, KV_HEADS, HD))


def _through_engine(batch: AttentionBatch, kv: PagedKVCache, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, use_kernel: bool) -> Callable[[], object]:
    real = cpu_prefill_attention.supports

    def call() -> object:
        if not use_kernel:
            cpu_prefill_attention.supports = lambda *_: False  # type: ignore[assignment]
        try:
            return batched_paged_attention(q, k, v, kv.k[0], kv.v[0], batch, HD ** -0.5)
        finally:
            cpu_prefill_attention.supports = real  # type: ignore[assignment]
    return call


def _causal(t: int, reps: int) -> None:
    scale = HD ** -0.5
    batch, kv, q, k, v = _step([t], [0])
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    out = torch.empty_like(q)
    pre = batch.prefill
    assert pre is not None

    def sdpa() -> object:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                              enable_gqa=True)

    def kernel() -> None:
        cpu_prefill_attention.prefill_attention(
            q, kv.k[0], kv.v[0], pre.sequences, pre.block_table, scale, None, out)
    attention.write_kv(k, v, kv.k[0], kv.v[0], batch.slot_mapping)
    _pair(f"causal {t}", sdpa, kernel, reps)


def per_call(reps: int) -> None:
    for t in (512, 1024, 2048):
        _causal(t, reps)
    for ctx, t in ((1536, 512), (512, 512)):
        batch, kv, q, k, v = _step([t], [ctx])
        _pair(f"prefix {ctx}+{t}", _through_engine(batch, kv, q, k, v, False),
              _through_engine(batch, kv, q, k, v, True), reps)
    for lens, ctxs in (([512, 300, 200], [0, 0, 0]),
                       ([256, 256, 100, 1, 1], [0, 512, 64, 900, 40])):
        batch, kv, q, k, v = _step(lens, ctxs)
        _pair(f"ragged {'/'.join(map(str, lens))}", _through_engine(batch, kv, q, k, v, False),
              _through_engine(batch, kv, q, k, v, True), reps)


def whole_step(reps: int, sizes: list[int]) -> None:
    from engine.loader import load_model
    from engine.runner import ModelRunner, SeqStep

    runner = ModelRunner(load_model("smollm2"), num_blocks=300)
    rng = random.Random(0)
    real = cpu_prefill_attention.supports
    for t in sizes:
        def one(use_kernel: bool, t: int = t) -> float:
            ids = tuple(rng.randrange(1000, 40000) for _ in range(t))
            table = runner.allocator.allocate(-(-t // BLOCK))
            if not use_kernel:
                cpu_prefill_attention.supports = lambda *_: False  # type: ignore[assignment]
            try:
                took = _timed(lambda: runner.step([SeqStep(ids, 0, tuple(table))]))
            finally:
                cpu_prefill_attention.supports = real  # type: ignore[assignment]
                runner.allocator.free(table)
            return took
        off, on = _alternated(reps, lambda: one(False), lambda: one(True))
        a, b = statistics.median(off) * 1e3, statistics.median(on) * 1e3
        print(f"step {t:<17} torch {min(off) * 1e3:7.1f} / {a:7.1f} ms   kernel "
              f"{min(on) * 1e3:7.1f} / {b:7.1f} ms   (best / median)   {b - a:+.1f} ms",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--step", action="store_true", help="also time whole prefill steps")
    parser.add_argument("--step-reps", type=int, default=5)
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--no-call", action="store_true", help="skip the per-call figures")
    args = parser.parse_args()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: the engines run with OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)
    torch.set_num_threads(args.threads)
    assert cpu_prefill_attention.available(), cpu_prefill_attention.unavailable_reason()
    cpu_pool.set_threads(args.threads)
    if not args.no_call:
        per_call(args.reps)
    if args.step:
        whole_step(args.step_reps, args.step_tokens)


if __name__ == "__main__":
    main()
