"""Greedy generation through the paged-cache runner must equal transformers token for token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.loader import LoadedModel, load_model
from engine.packed_linear import PackedLinear, read_ahead_in_order
from engine.runner import ModelRunner, SeqStep
from tests.helpers.tiny_models import VARIANTS, make_tiny_model

BLOCK = 16
NEW_TOKENS = 12


class Seq:
    """Test-side bookkeeping of one sequence's tokens and blocks."""

    def __init__(self, runner: ModelRunner, prompt: Sequence[int]) -> None:
        self.runner = runner
        self.tokens = list(prompt)
        self.computed = 0
        self.blocks: list[int] = []

    def step_for(self, n: int) -> SeqStep:
        end = self.computed + n
        need = -(-end // BLOCK) - len(self.blocks)
        if need > 0:
            self.blocks += self.runner.allocator.allocate(need)
        step = SeqStep(tuple(self.tokens[self.computed:end]), self.computed, tuple(self.blocks))
        self.computed = end
        return step


def prompt_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run_greedy(
    loaded: LoadedModel, prompt: list[int], chunks: Sequence[int] | None = None,
    new_tokens: int = NEW_TOKENS,
) -> tuple[list[int], torch.Tensor]:
    runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    seq = Seq(runner, prompt)
    for size in chunks or [len(prompt)]:
        logits = runner.step([seq.step_for(size)])
    assert seq.computed == len(prompt)
    first_logits = logits[0]
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        seq.tokens.append(token)
        logits = runner.step([seq.step_for(1)])
    return out, first_logits


def hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[LoadedModel, torch.nn.Module]]:
    out = {}
    for variant, path in tiny_model_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        # The runner never stops on EOS (that is StopChecker's job), so neither may the oracle.
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        out[variant] = (load_model(path), hf)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [5, 16, 17, 40])
def test_greedy_matches_transformers(models: dict, variant: str, length: int) -> None:
    loaded, hf = models[variant]
    prompt = prompt_ids(length, seed=length)
    ours, first_logits = run_greedy(loaded, prompt)
    assert ours == hf_greedy(hf, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(first_logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "llama3"])
@pytest.mark.parametrize("chunks", [[16, 16, 8], [7, 20, 13], [39, 1]])
def test_chunked_prefill_matches_transformers(
    models: dict, variant: str, chunks: list[int]
) -> None:
    loaded, hf = models[variant]
    prompt = prompt_ids(40, seed=99)
    ours, first_logits = run_greedy(loaded, prompt, chunks=chunks)
    assert ours == hf_greedy(hf, prompt)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
def test_cached_prefix_in_separate_step(models: dict, variant: str) -> None:
    """A prefix computed by an earlier step (another request) is reused without recompute."""
    loaded, hf = models[variant]
    runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    prefix = prompt_ids(32, seed=5)
    first = Seq(runner, prefix)
    runner.step([first.step_for(32)])
    # A second sequence shares the two full prefix blocks and computes only its suffix.
    suffix = prompt_ids(9, seed=6)
    second = Seq(runner, prefix + suffix)
    second.blocks = list(first.blocks)
    second.computed = 32
    logits = runner.step([second.step_for(9)])
    out = []
    for _ in range(NEW_TOKENS):
        token = int(logits[0].argmax())
        out.append(token)
        second.tokens.append(token)
        logits = runner.step([second.step_for(1)])
    assert out == hf_greedy(hf, prefix + suffix)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_batched_decode_equals_one_at_a_time(models: dict, variant: str) -> None:
    loaded, _ = models[variant]
    prompts = [prompt_ids(n, seed=n + 1) for n in (5, 17, 33)]
    alone = [run_greedy(loaded, p)[0] for p in prompts]

    runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    seqs = [Seq(runner, p) for p in prompts]
    # Prefill all three in one flattened step, then decode them together.
    logits = runner.step([s.step_for(len(s.tokens)) for s in seqs])
    outs: list[list[int]] = [[] for _ in seqs]
    for _ in range(NEW_TOKENS):
        for i, s in enumerate(seqs):
            token = int(logits[i].argmax())
            outs[i].append(token)
            s.tokens.append(token)
        logits = runner.step([s.step_for(1) for s in seqs])
    assert outs == alone


def test_blocks_moved_to_fresh_ids_continue_identically(models: dict) -> None:
    """read_block/write_block is how KV travels between engines; copies must be exact."""
    loaded, _ = models["llama"]
    prompt = prompt_ids(37, seed=3)
    expected, _ = run_greedy(loaded, prompt)

    src = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    seq = Seq(src, prompt)
    logits = src.step([seq.step_for(len(prompt))])
    first = int(logits[0].argmax())
    payload = [src.kv.read_block(b) for b in seq.blocks]
    assert payload[0].shape == (loaded.config.num_layers, 2, BLOCK, 2, 16)
    assert payload[0].numel() * payload[0].element_size() == src.kv.block_nbytes

    dst = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    dst.allocator.allocate(5)  # so the copied blocks land on different ids
    moved = Seq(dst, prompt + [first])
    moved.blocks = dst.allocator.allocate(len(payload))
    assert moved.blocks != seq.blocks
    for block_id, data in zip(moved.blocks, payload, strict=True):
        dst.kv.write_block(block_id, data)
    moved.computed = len(prompt)
    out = [first]
    logits = dst.step([moved.step_for(1)])
    for _ in range(NEW_TOKENS - 1):
        token = int(logits[0].argmax())
        out.append(token)
        moved.tokens.append(token)
        logits = dst.step([moved.step_for(1)])
    assert out == expected


@pytest.mark.parametrize("length", [6, 40])
def test_mistral_sliding_window_matches_transformers(
    tmp_path: Path, length: int
) -> None:
    """A window of 8 over a 40-token prompt and 12 new tokens: most keys are outside it."""
    path = make_tiny_model(tmp_path / "mistral-sw", "mistral", seed=11, sliding_window=8)
    loaded = load_model(path)
    assert loaded.config.sliding_window == 8
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = prompt_ids(length, seed=length + 50)
    for chunks in ([length], [3, length - 3]):
        ours, first_logits = run_greedy(loaded, prompt, chunks=chunks)
        assert ours == hf_greedy(hf, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(first_logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_thread_few_row_path_matches_transformers(tiny_model_dirs: dict[str, Path],
                                                      models: dict, variant: str) -> None:
    """On one thread decode steps run on the linear pool's caller alone
    (engine.cpu_linear_pool): still transformers' tokens."""
    _, hf = models[variant]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(tiny_model_dirs[variant])
        linears = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
        assert linears and all(m.few_rows is not None for m in linears)
        prompt = prompt_ids(17, seed=17)
        ours, _ = run_greedy(loaded, prompt, new_tokens=2 * NEW_TOKENS)
    finally:
        torch.set_num_threads(before)
    assert ours == hf_greedy(hf, prompt, 2 * NEW_TOKENS)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
def test_last_layer_for_last_rows_only_equals_every_row(models: dict, variant: str) -> None:
    """A step of several tokens runs its last layer past the K/V for each sequence's last token
    alone. Against the same step with every row through the last layer: the same logits, and
    every layer's cache bit-identical (the last layer still writes every token's K/V). The
    step mixes a decoding row, a chunk after a cached prefix and a whole prompt."""
    loaded, _ = models[variant]
    runners = [ModelRunner(loaded, num_blocks=32, block_size=BLOCK) for _ in range(2)]
    results = []
    for r, runner in enumerate(runners):
        decoding = Seq(runner, prompt_ids(21, seed=5))
        chunked = Seq(runner, prompt_ids(37, seed=6))
        whole = Seq(runner, prompt_ids(19, seed=7))
        runner.step([decoding.step_for(21), chunked.step_for(16)])
        decoding.tokens.append(9)
        steps = [decoding.step_for(1), chunked.step_for(21), whole.step_for(19)]
        if r == 0:
            logits = runner.step(steps)
        else:  # every row through the last layer, then each sequence's last kept
            ids = [t for s in steps for t in s.token_ids]
            positions = [p for s in steps
                         for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
            batch = runner._layout(steps, [len(s.token_ids) for s in steps],
                                   [s.start_pos for s in steps])
            with torch.inference_mode():
                hidden = runner.model(torch.tensor(ids), torch.tensor(positions), batch,
                                      runner.kv)
                last = torch.tensor(batch.cu_query_lens[1:]) - 1
                logits = runner.model.compute_logits(hidden[last])
        caches = zip(runner.kv.k, runner.kv.v, strict=True)
        results.append((logits, [(k.clone(), v.clone()) for k, v in caches]))
    (ours, our_kv), (every, every_kv) = results
    assert ours.shape == every.shape == (3, loaded.config.vocab_size)
    torch.testing.assert_close(ours, every, atol=1e-5, rtol=1e-5)
    assert ours.argmax(-1).tolist() == every.argmax(-1).tolist()
    for (k1, v1), (k2, v2) in zip(our_kv, every_kv, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_reading_weights_ahead_changes_no_result(models: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """PANTRY_CPU_READ_AHEAD=1 links every pool linear to the next one a step runs (read ahead
    by the pool's idle helper); the logits of decode steps are bit-identical with the links and
    without."""
    loaded, _ = models["llama"]
    linears = loaded.model.linears_in_step_order()
    if not all(isinstance(m, PackedLinear) and m.few_rows is not None for m in linears):
        pytest.skip("no pool linears here (no compiler, or the pool is off)")
    assert len(linears) == 4 * loaded.config.num_layers + 1
    monkeypatch.delenv("PANTRY_CPU_READ_AHEAD", raising=False)
    assert read_ahead_in_order(linears) == 0  # off by default
    assert all(m.then is None for m in linears)

    def decode(read_ahead: bool) -> list[torch.Tensor]:
        for m in linears:
            m.then = None
        if read_ahead:
            monkeypatch.setenv("PANTRY_CPU_READ_AHEAD", "1")
            assert read_ahead_in_order(linears) == len(linears)
            assert all(m.then is n.few_rows.blocked
                       for m, n in zip(linears, linears[1:] + linears[:1], strict=True))
        runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
        seqs = [Seq(runner, prompt_ids(n, seed=n)) for n in (9, 30)]
        runner.step([s.step_for(len(s.tokens)) for s in seqs])
        out = []
        for t in range(6):
            for s in seqs:
                s.tokens.append(100 + t)
            out.append(runner.step([s.step_for(1) for s in seqs]))
        for m in linears:
            m.then = None
        return out

    without, with_links = decode(False), decode(True)
    assert all(torch.equal(a, b) for a, b in zip(without, with_links, strict=True))
