"""What one long-context sequence adds to a decode step: SmolLM2-135M (float32, CPU) through the
engine's ModelRunner, short streams alone and with one long sequence beside them, this tree's
CPU paged decode kernel against a baseline, alternated step by step in one process on the same
loaded model and cache, so both see the same machine:

  * with `--baseline-tree DIR` (a checkout of an earlier commit, e.g. a `git worktree`), that
    tree's `engine/cpu_paged_attention.py`, loaded beside this one;
  * without it, torch's path (every sequence's context gathered, then SDPA).

In `pantry local` decode computes on one core while prefill computes, so the default is one
thread. A long sequence's attention reads all of its keys and values each step (4k tokens of
SmolLM2: 189 MB), while the step's linears stream the weights (540 MB): the added time is what
sets decode's slow steps while long prompts arrive (bench/interference.py).

`--beside-prefill` measures that case itself: this process computes on its last CPU, a prefill
engine's work (the same model over 2048-token chunks, a process of its own) on the others, and
the comparison is this tree's kernel with the C pool's far helpers (one per other CPU, as a
confined decode engine runs them: engine.cpu_split) against without. It also prints the far
helpers' CPU time per step with the long sequence: what prefill gives up.

    .venv/bin/python bench/long_context_decode.py [--context 4096] [--streams 4] [--steps 30]
        [--threads 1] [--baseline-tree /tmp/old | --beside-prefill]
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import cpu_paged_attention, cpu_pool  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.runner import ModelRunner, SeqStep  # noqa: E402

SHORT_CONTEXT = 200  # the streams' contexts: a few blocks each


def baseline_kernel(tree: Path | None) -> tuple[str, Callable[..., torch.Tensor] | None]:
    """The baseline's name and its kernel function; None: torch's path."""
    if tree is None:
        return "torch path", None
    spec = importlib.util.spec_from_file_location(
        "baseline_cpu_paged_attention", tree / "engine" / "cpu_paged_attention.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.available():
        sys.exit(f"the baseline kernel does not build: {module.unavailable_reason()}")
    return f"{tree}", module.paged_decode_attention_cpu


class Kernels:
    """Switches the engine's decode attention between this tree's kernel and the baseline."""

    def __init__(self, baseline: Callable[..., torch.Tensor] | None) -> None:
        self.ours = cpu_paged_attention.paged_decode_attention_cpu
        self.baseline = baseline

    def use(self, which: str) -> None:
        if which == "ours":
            cpu_paged_attention.paged_decode_attention_cpu = self.ours
            cpu_paged_attention.available = lambda: True  # type: ignore[assignment]
        elif self.baseline is not None:
            cpu_paged_attention.paged_decode_attention_cpu = self.baseline
        else:
            cpu_paged_attention.available = lambda: False  # type: ignore[assignment]


# The prefill engine's work beside decode: the model over chunks of 2048 new tokens, forever.
PREFILL_LOOP = """
import random, sys, torch
from engine.loader import load_model
from engine.runner import ModelRunner, SeqStep
torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
runner = ModelRunner(load_model("smollm2"), num_blocks=300)
rng = random.Random(2)
table = tuple(runner.allocator.allocate(256))
print("ready", flush=True)
while True:
    for start in (0, 2048):
        runner.step([SeqStep(tuple(rng.randrange(1000, 40000) for _ in range(2048)), start, table)])
"""


class FarHelpers:
    """The pool's far helpers on the CPUs this process does not compute on, switched on or off;
    the CPU time they used (they stay, asleep, while off)."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus
        self.seen: set[int] = set()

    def use(self, on: bool) -> None:
        tids = cpu_pool.set_far_helpers(len(self.cpus) if on else 0)
        for tid in tids:
            os.sched_setaffinity(tid, self.cpus)
        self.seen.update(tids)

    def cpu_seconds(self) -> float:
        total = 0.0
        for tid in self.seen:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=4096, help="the long sequence's context")
    ap.add_argument("--streams", type=int, default=4, help="short streams beside it")
    ap.add_argument("--steps", type=int, default=30, help="steps per kernel and batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--beside-prefill", action="store_true",
                    help="prefill's work on the other CPUs; far helpers against none")
    ns = ap.parse_args()
    if not cpu_paged_attention.available():
        sys.exit(f"no CPU paged kernel here: {cpu_paged_attention.unavailable_reason()}")
    base_name, base_fn = baseline_kernel(ns.baseline_tree)
    prefill: subprocess.Popen[str] | None = None
    far: FarHelpers | None = None
    if ns.beside_prefill:
        if ns.baseline_tree is not None or not cpu_pool.available():
            sys.exit("--beside-prefill compares far helpers in this tree's pool: no baseline "
                     "tree, and the C pool must build")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            sys.exit("--beside-prefill needs two CPUs")
        own, others = cpus[-1], set(cpus[:-1])
        os.sched_setaffinity(0, {own})
        far = FarHelpers(others)
        base_name = "no far helpers"
        prefill = subprocess.Popen(
            [sys.executable, "-c", PREFILL_LOOP], stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent,
            preexec_fn=lambda: os.sched_setaffinity(0, others))
        atexit.register(prefill.kill)  # a run stopped early leaves no prefill loop spinning
        assert prefill.stdout is not None
        prefill.stdout.readline()  # "ready": its model is loaded, its chunks start
    torch.set_num_threads(ns.threads)
    runner = ModelRunner(load_model("smollm2"), num_blocks=ns.context // 16 + 200)
    if cpu_pool.available():
        cpu_pool.set_threads(ns.threads)
    rng = random.Random(1)

    def prefilled(context: int) -> SeqStep:
        tokens = [rng.randrange(1000, 40000) for _ in range(context)]
        table = tuple(runner.allocator.allocate(-(-(context + 1) // runner.block_size)))
        for start in range(0, context - 1, 512):
            runner.step([SeqStep(tuple(tokens[start:min(start + 512, context - 1)]), start,
                                 table)])
        return SeqStep((tokens[-1],), context - 1, table)  # the next step: one token

    print(f"prefilling {ns.streams} x {SHORT_CONTEXT} and 1 x {ns.context} tokens", flush=True)
    shorts = [prefilled(SHORT_CONTEXT) for _ in range(ns.streams)]
    batches = {"streams": shorts, "with long": [*shorts, prefilled(ns.context)]}
    kernels = Kernels(base_fn)
    times: dict[tuple[str, str], list[float]] = {
        (k, b): [] for k in ("ours", "baseline") for b in batches}
    tokens: dict[str, list[int]] = {"ours": [], "baseline": []}
    for step in range(ns.steps):
        for which in ("ours", "baseline") if step % 2 else ("baseline", "ours"):
            if far is not None:
                far.use(which == "ours")
            else:
                kernels.use(which)
            for name, seqs in batches.items():
                start = time.perf_counter()
                logits = runner.step(seqs)
                times[(which, name)].append(time.perf_counter() - start)
                if step == 0 and name == "with long":
                    tokens[which] = logits.argmax(-1).tolist()
    kernels.use("ours")
    if far is not None and prefill is not None:
        far.use(False)
        prefill.kill()
        prefill.wait()
        # Only the steps with the long sequence wake them (the streams' are under the kernel's
        # FAR_POSITIONS).
        per_step = far.cpu_seconds() / ns.steps
        print(f"prefill's work on CPUs {sorted(far.cpus)}; far helpers' CPU time: "
              f"{per_step * 1e3:.1f} ms a step with the long sequence")
    print(f"SmolLM2-135M float32, {ns.threads} thread(s), {ns.streams} streams of "
          f"{SHORT_CONTEXT} tokens + 1 of {ns.context}, median of {ns.steps} steps each")
    print(f"greedy tokens the same: {tokens['ours'] == tokens['baseline']}")
    print(f"{'kernel':<12} {'streams ms':>10} {'with long':>10} {'ratio':>6} {'added ms':>9}")
    added = {}
    for which, label in (("ours", "this tree"), ("baseline", "baseline")):
        alone = statistics.median(times[(which, "streams")])
        both = statistics.median(times[(which, "with long")])
        added[which] = both - alone
        print(f"{label:<12} {alone * 1e3:>10.1f} {both * 1e3:>10.1f} {both / alone:>6.2f} "
              f"{added[which] * 1e3:>9.1f}")
    print(f"baseline: {base_name}; added time, this tree / baseline: "
          f"{added['ours'] / added['baseline']:.2f}")


if __name__ == "__main__":
    main()
