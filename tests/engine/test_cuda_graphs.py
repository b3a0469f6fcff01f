"""Decode steps replayed as CUDA graphs (engine/cuda_graphs.py).

On CUDA: replayed steps give the eager steps' tokens and logits, for ragged batches padded to a
captured size and across block boundaries; greedy output through graphs equals transformers';
steps that are not a graph's (prompts, mixed batches) run eagerly and still agree. Without CUDA
those skip with the reason, and the setting is checked to change nothing on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.cuda_graphs import GRAPH_SIZES
from engine.loader import LoadedModel, load_model
from engine.runner import ModelRunner
from tests.engine.test_gpu_path import _hf, _hf_greedy, needs_cuda
from tests.engine.test_runner_vs_transformers import BLOCK, NEW_TOKENS, Seq, prompt_ids


def test_graphs_asked_for_on_cpu_change_nothing(tiny_llama: Path) -> None:
    runner = ModelRunner(load_model(tiny_llama), num_blocks=8, block_size=BLOCK,
                         cuda_graphs=True)
    assert runner.graphs is None
    assert (runner.kv.num_blocks, runner.allocator.num_free) == (8, 8)


@pytest.fixture(scope="module")
def cuda_llama(tiny_llama: Path) -> LoadedModel:
    return load_model(tiny_llama, device="cuda")


def _decode(runner: ModelRunner, prompts: list[list[int]], steps: int
            ) -> tuple[list[list[int]], list[torch.Tensor]]:
    seqs = [Seq(runner, p) for p in prompts]
    logits = runner.step([s.step_for(len(s.tokens)) for s in seqs])  # prompts: eager
    outs: list[list[int]] = [[] for _ in seqs]
    seen = []
    for _ in range(steps):
        for i, s in enumerate(seqs):
            token = int(logits[i].argmax())
            outs[i].append(token)
            s.tokens.append(token)
        logits = runner.step([s.step_for(1) for s in seqs])
        seen.append(logits)
    return outs, seen


@needs_cuda
@pytest.mark.parametrize("lengths", [(5,), (5, 17, 33), (15, 16, 31, 32)])
def test_replayed_steps_equal_eager_steps(cuda_llama: LoadedModel,
                                          lengths: tuple[int, ...]) -> None:
    prompts = [prompt_ids(n, seed=n + 3) for n in lengths]
    eager = ModelRunner(cuda_llama, num_blocks=32, block_size=BLOCK)
    graphed = ModelRunner(cuda_llama, num_blocks=32, block_size=BLOCK, cuda_graphs=True)
    assert graphed.graphs is not None and graphed.allocator.num_free == 32
    steps = 20  # 5 -> 25, 17 -> 37, 31 -> 51: each crosses a block boundary while replayed
    want, want_logits = _decode(eager, prompts, steps)
    got, got_logits = _decode(graphed, prompts, steps)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert graphed.graphs.replays == steps
    assert graphed.graphs.captured == (next(s for s in GRAPH_SIZES if s >= len(lengths)),)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_through_graphs_matches_transformers(tiny_llama: Path,
                                                    dtype: torch.dtype) -> None:
    loaded = load_model(tiny_llama, dtype=dtype, device="cuda")
    runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK, cuda_graphs=True)
    prompt = prompt_ids(40, seed=5)
    ours, _ = _decode(runner, [prompt], NEW_TOKENS)
    want, _ = _hf_greedy(_hf(tiny_llama, dtype, "cuda"), prompt, "cuda")
    if dtype == torch.float32:
        assert ours[0] == want
    else:  # bfloat16: different summation orders may part ways after a few tokens
        assert ours[0][:2] == want[:2]
    assert runner.graphs is not None and runner.graphs.replays == NEW_TOKENS


@needs_cuda
def test_a_step_with_a_prompt_runs_eagerly_and_agrees(cuda_llama: LoadedModel) -> None:
    graphed = ModelRunner(cuda_llama, num_blocks=32, block_size=BLOCK, cuda_graphs=True)
    eager = ModelRunner(cuda_llama, num_blocks=32, block_size=BLOCK)
    results = []
    for runner in (eager, graphed):
        a, b = Seq(runner, prompt_ids(9, seed=1)), Seq(runner, prompt_ids(20, seed=2))
        runner.step([a.step_for(9)])
        a.tokens.append(7)
        # One sequence decodes while the other's prompt is computed: not a graph's step.
        results.append(runner.step([a.step_for(1), b.step_for(20)]))
    assert graphed.graphs is not None and graphed.graphs.replays == 0
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


@needs_cuda
def test_capture_ahead_takes_every_size_a_batch_can_replay(cuda_llama: LoadedModel) -> None:
    runner = ModelRunner(cuda_llama, num_blocks=16, block_size=BLOCK, cuda_graphs=True)
    assert runner.graphs is not None
    assert runner.graphs.capture(5) == 4
    assert runner.graphs.captured == (1, 2, 4, 8)
