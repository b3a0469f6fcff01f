"""Greedy output through real processes equals transformers, on a miss, a hit and a partial hit,
for prompts shorter than a block, exactly one block, one past a block and many blocks."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import torch

from tests.e2e.local_system import LocalSystem

BLOCK = 16
NEW_TOKENS = 12


@cache
def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    model = _hf_model(str(model_dir))
    with torch.no_grad():
        # An explicit mask: otherwise transformers masks every token equal to the pad id.
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return list(out[0, len(ids):].tolist())


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(length)]


@pytest.fixture(params=["llama", "qwen2"])
def arch_system(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]
                ) -> tuple[LocalSystem, Path]:
    return request.getfixturevalue(f"{request.param}_system"), tiny_dirs[request.param]


@pytest.mark.parametrize("length", [5, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_miss_then_hit_match_transformers(arch_system: tuple[LocalSystem, Path],
                                          length: int) -> None:
    system, model_dir = arch_system
    ids = prompt(length, seed=length)
    expected = hf_greedy(model_dir, ids, NEW_TOKENS)

    first = system.complete(ids, NEW_TOKENS)
    assert first["choices"][0]["prompt_token_ids"] == ids
    assert first["choices"][0]["token_ids"] == expected
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    before = system.prefill_load()
    again = system.complete(ids, NEW_TOKENS)
    after = system.prefill_load()
    assert again["choices"][0]["token_ids"] == expected
    # The whole prompt was in the pool (or had no full block): straight to decode.
    assert again["usage"]["prefill_skipped"] is True
    assert after.requests_total == before.requests_total
    assert after.computed_tokens_total == before.computed_tokens_total
    full_blocks = length // BLOCK
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    if full_blocks:
        # Every full block came from the pool; only the last token is recomputed at most.
        assert cached == min(full_blocks * BLOCK, length - 1)
    else:
        assert cached == 0


def test_partial_prefix_hit(arch_system: tuple[LocalSystem, Path]) -> None:
    system, model_dir = arch_system
    base = prompt(3 * BLOCK + 2, seed=101)
    system.complete(base, 4)
    shared = base[: 2 * BLOCK + 7]
    other = shared + prompt(20, seed=202)
    expected = hf_greedy(model_dir, other, NEW_TOKENS)
    before = system.prefill_load()
    got = system.complete(other, NEW_TOKENS)
    after = system.prefill_load()
    assert got["choices"][0]["token_ids"] == expected
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
    assert got["usage"]["prefill_skipped"] is False
    assert after.computed_tokens_total - before.computed_tokens_total == len(other) - 2 * BLOCK


def test_decode_writes_back_blocks_its_output_completes(
        arch_system: tuple[LocalSystem, Path]) -> None:
    system, model_dir = arch_system
    turn1 = prompt(BLOCK + 4, seed=303)
    out1 = system.complete(turn1, 2 * BLOCK)["choices"][0]["token_ids"]
    # The next turn of the conversation starts with the first turn's prompt and answer.
    turn2 = turn1 + out1 + prompt(6, seed=404)
    expected = hf_greedy(model_dir, turn2, NEW_TOKENS)
    got = system.complete(turn2, NEW_TOKENS)
    assert got["choices"][0]["token_ids"] == expected
    kv_computed_by_decode = len(turn1) + len(out1) - 1  # the last token's KV is never computed
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        kv_computed_by_decode // BLOCK * BLOCK)


def test_concurrent_requests_each_match_transformers(llama_system: LocalSystem,
                                                     tiny_dirs: dict[str, Path]) -> None:
    prompts = [prompt(n, seed=500 + n) for n in (3, 19, 33, 47, 64)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda ids: llama_system.complete(ids, NEW_TOKENS), prompts))
    for ids, res in zip(prompts, results, strict=True):
        assert res["choices"][0]["token_ids"] == hf_greedy(tiny_dirs["llama"], ids, NEW_TOKENS)


def test_tenants_never_share_cached_kv(llama_system: LocalSystem) -> None:
    ids = prompt(2 * BLOCK + 3, seed=600)
    first = llama_system.complete(ids, 3, user="tenant-a")
    again = llama_system.complete(ids, 3, user="tenant-a")
    other = llama_system.complete(ids, 3, user="tenant-b")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["choices"][0]["token_ids"] == other["choices"][0]["token_ids"]


def test_seeded_sampling_is_the_same_on_miss_and_hit(llama_system: LocalSystem) -> None:
    ids = prompt(3 * BLOCK + 1, seed=700)
    sampled = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}
    miss = llama_system.complete(ids, 16, seed=1234, **sampled)
    hit = llama_system.complete(ids, 16, seed=1234, **sampled)
    other = llama_system.complete(ids, 16, seed=99, **sampled)
    assert miss["usage"]["prefill_skipped"] is False and hit["usage"]["prefill_skipped"] is True
    assert hit["choices"][0]["token_ids"] == miss["choices"][0]["token_ids"]
    assert other["choices"][0]["token_ids"] != miss["choices"][0]["token_ids"]


def test_completion_without_max_tokens_gives_openais_default(llama_system: LocalSystem) -> None:
    resp = llama_system.post("/v1/completions", {"prompt": prompt(10, seed=800),
                                                 "temperature": 0, "ignore_eos": True})
    assert resp.json()["usage"]["completion_tokens"] == 16
