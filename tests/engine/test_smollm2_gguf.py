"""The embedded SmolLM2 GGUF loaded by us must equal transformers loading the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import cpu_quant_linear
from engine.cpu_quant_linear import QuantWeight
from engine.gguf_file import Q4_1, Q8_0
from engine.loader import LoadedModel, load_model
from engine.model_files import load_model_config, load_tokenizer
from engine.packed_linear import PackedLinear
from engine.runner import ModelRunner, SeqStep
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.helpers.tiny_models import smollm2_gguf_path

pytestmark = pytest.mark.slow  # loads the real GGUF twice, ours and transformers'

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Numbers: 1234567 3.14159 -42 1e10",
    "Unicode: café naïve Ünïcödé 日本語のテキスト Привет мир",
    "Emoji: 🙂👍🏽🚀 family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    "don't I'll we've",
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model("smollm2")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def hf_model(gguf: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 2
    return model


def test_identity(ours: LoadedModel) -> None:
    assert ours.model_id == "SmolLM2-135M-Instruct"
    assert len(ours.weights_digest) == 32
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)
    assert load_model_config("smollm2") == cfg


def test_logits_and_greedy_match_transformers(
    ours: LoadedModel, hf_model: torch.nn.Module, hf_tokenizer  # type: ignore[no-untyped-def]
) -> None:
    prompt = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = hf_tokenizer(prompt)["input_ids"]
    runner = ModelRunner(ours, num_blocks=16)
    blocks = tuple(runner.allocator.allocate(8))
    logits = runner.step([SeqStep(tuple(ids), 0, blocks)])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, atol=1e-3, rtol=1e-3)

    tokens = list(ids)
    out: list[int] = []
    for _ in range(20):
        token = int(logits[0].argmax())
        out.append(token)
        tokens.append(token)
        logits = runner.step([SeqStep((token,), len(tokens) - 1, blocks)])
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)
    assert out == expected[0, len(ids):].tolist()
    assert out == _greedy_on_one_thread(ids, 20)


def _greedy_on_one_thread(ids: list[int], n: int) -> list[int]:
    """Greedy tokens from a model loaded and run on one thread: its decode steps run on the
    linear pool's caller alone (engine.cpu_linear_pool), not split over two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model("smollm2")
        head = loaded.model.lm_head
        assert isinstance(head, PackedLinear) and head.few_rows is not None
        runner = ModelRunner(loaded, num_blocks=16)
        blocks = tuple(runner.allocator.allocate(8))
        logits = runner.step([SeqStep(tuple(ids), 0, blocks)])
        tokens, out = list(ids), []
        for _ in range(n):
            out.append(int(logits[0].argmax()))
            tokens.append(out[-1])
            logits = runner.step([SeqStep((out[-1],), len(tokens) - 1, blocks)])
        return out
    finally:
        torch.set_num_threads(before)


def test_gguf_tokenizer_encodes_like_transformers(
    ours: LoadedModel, hf_tokenizer  # type: ignore[no-untyped-def]
) -> None:
    tok = ours.tokenizer
    assert tok is not None
    for text in TEXTS:
        expected = hf_tokenizer(text)["input_ids"]
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1
    assert tok.vocab_size == 49152


def test_chat_template_matches_transformers(
    ours: LoadedModel, hf_tokenizer  # type: ignore[no-untyped-def]
) -> None:
    tok = ours.tokenizer
    assert tok is not None
    convo = [{"role": "system", "content": "Be terse."}, *MESSAGES,
             {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And 🇩🇪?"}]
    for messages in (MESSAGES, convo):
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_hf_dir_tokenizer_matches_transformers(
    hf_tokenizer, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """An HF directory's tokenizer.json/tokenizer_config.json/chat template are honoured."""
    hf_tokenizer.save_pretrained(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == reference(text)["input_ids"], text
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES) == expected
    assert tok.eos_token_ids == (reference.eos_token_id,)


def test_load_tokenizer_without_files_is_none(tiny_model_dirs: dict[str, Path]) -> None:
    assert load_tokenizer(tiny_model_dirs["llama"]) is None


def test_incremental_detokenizer_streams_exact_text(ours: LoadedModel) -> None:
    tok = ours.tokenizer
    assert tok is not None
    text = "Emoji 👨‍👩‍👧 and 日本語, then ascii."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Multi-byte characters span several byte-level tokens, so some pushes must yield nothing.
    assert "" in pieces


@pytest.mark.skipif(not cpu_quant_linear.available(), reason="no C compiler or the pool is off")
def test_decode_linears_compute_from_the_files_quantized_weights(ours: LoadedModel) -> None:
    """Every linear's decode copy is the file's codes (Q4_1, the tied LM head Q8_0), and decode
    steps give bit-identical logits to the float32 copies'."""
    linears = ours.model.linears_in_step_order()
    copies = [m.few_rows for m in linears if isinstance(m, PackedLinear)]
    assert len(copies) == len(linears) == 121
    assert all(isinstance(c, QuantWeight) for c in copies)
    assert [c.fmt for c in copies if isinstance(c, QuantWeight)] == [Q4_1] * 120 + [Q8_0]

    def decode(loaded: LoadedModel) -> list[torch.Tensor]:
        runner = ModelRunner(loaded, num_blocks=32)
        tables = [tuple(runner.allocator.allocate(4)) for _ in range(8)]
        prompts = [[100 + 7 * i + j for j in range(5 + i)] for i in range(8)]
        runner.step([SeqStep(tuple(p), 0, t) for p, t in zip(prompts, tables, strict=True)])
        out = []
        for n in (1, 4, 8):  # one tile, a partial one, and more rows than a tile
            out.append(runner.step([SeqStep((7,), len(p), t) for p, t in
                                    zip(prompts[:n], tables[:n], strict=True)]))
        return out

    plain = load_model("smollm2", quantized=False)
    assert not any(isinstance(m.few_rows, QuantWeight)
                   for m in plain.model.linears_in_step_order() if isinstance(m, PackedLinear))
    assert all(torch.equal(a, b) for a, b in zip(decode(ours), decode(plain), strict=True))
