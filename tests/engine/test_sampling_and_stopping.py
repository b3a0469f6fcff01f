from __future__ import annotations

import pytest
import torch

from engine.sampling import Sampler, make_generator
from engine.stopping import StopChecker
from pantry.common.errors import InvalidRequest
from pantry.common.sampling import SamplingParams


def random_logits(rows: int = 4, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = random_logits()
    params = [SamplingParams()] * 4
    assert Sampler().sample(logits, params, [None] * 4) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_varies_with_seed() -> None:
    logits = random_logits(rows=1)
    p = SamplingParams(temperature=1.5)

    def draw(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [Sampler().sample(logits, [p], [gen])[0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert make_generator(None) is None


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=5.0, top_p=1e-6),
    SamplingParams(temperature=5.0, top_k=50, top_p=1e-6),
])
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    logits = random_logits()
    gens = [make_generator(i) for i in range(4)]
    assert Sampler().sample(logits, [params] * 4, gens) == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_top_k() -> None:
    logits = random_logits(rows=1)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    gen = make_generator(1)
    p = SamplingParams(temperature=10.0, top_k=3)
    draws = {Sampler().sample(logits, [p], [gen])[0] for _ in range(100)}
    assert draws <= top3 and len(draws) > 1


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", {"temperature": -0.1}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
])
def test_invalid_params_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**kwargs)


def test_stop_checker() -> None:
    checker = StopChecker([2])
    p = SamplingParams(max_tokens=3, stop_token_ids=(7,))
    assert checker.check(5, 1, p) is None
    assert checker.check(2, 1, p) == "stop"
    assert checker.check(7, 1, p) == "stop"
    assert checker.check(5, 3, p) == "length"
    ignoring = SamplingParams(max_tokens=3, ignore_eos=True)
    assert checker.check(2, 1, ignoring) is None
    assert checker.check(2, 3, ignoring) == "length"
