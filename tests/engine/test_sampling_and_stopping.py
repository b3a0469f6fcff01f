from __future__ import annotations

import pytest
import torch

from engine.sampling import Sampler, locate, make_generator
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


def test_draws_follow_the_softmax_of_the_scaled_logits() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]])
    p = SamplingParams(temperature=2.0)
    gen = make_generator(3)
    n = 20000
    counts = torch.bincount(torch.tensor(
        [Sampler().sample(logits, [p], [gen])[0] for _ in range(n)]), minlength=4)
    expected = torch.softmax(logits[0] / 2.0, dim=-1) * n  # 3006, 4956, 8171, 0
    # 5 standard deviations of a binomial count at most: about 330 draws.
    assert (counts - expected).abs().max().item() < 330
    assert counts[3].item() == 0


def test_a_seeded_row_draws_the_same_alone_or_beside_others() -> None:
    logits = random_logits(rows=4, vocab=50)
    params = [SamplingParams(temperature=1.0), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=10), SamplingParams(temperature=1.0)]
    alone_gen, batch_gens = make_generator(7), [make_generator(s) for s in (7, None, 9, 10)]
    alone = [Sampler().sample(logits[:1], params[:1], [alone_gen])[0] for _ in range(30)]
    batched = [Sampler().sample(logits, params, batch_gens) for _ in range(30)]
    assert [b[0] for b in batched] == alone
    assert {b[1] for b in batched} == {int(logits[1].argmax())}


def test_top_p_only_draws_from_the_nucleus() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]])
    probs = torch.softmax(logits[0], dim=-1)  # 0.33, 0.30, 0.27, ...: three reach 0.9
    assert probs[:2].sum() < 0.9 <= probs[:3].sum()
    gen = make_generator(5)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    draws = {Sampler().sample(logits, [p], [gen])[0] for _ in range(300)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("weights,u,token", [
    ([0.5, 0.5, 0.0, 0.0], 0.0, 0),
    ([0.5, 0.5, 0.0, 0.0], 0.4999, 0),
    ([0.5, 0.5, 0.0, 0.0], 0.5, 1),
    ([0.0, 1.0, 0.0], 0.0, 1),       # a zero-weight first token is never drawn
    ([0.5, 0.0, 0.5, 0.0], 0.5, 2),  # nor one between two others
    ([0.5, 0.5, 0.0, 0.0], 1.0, 1),  # a draw rounded up to the total: the last weighted token
])
def test_locate_picks_the_interval_holding_the_draw(weights: list[float], u: float,
                                                    token: int) -> None:
    cdf = torch.cumsum(torch.tensor([weights], dtype=torch.float64), dim=-1)
    assert locate(cdf, torch.tensor([u], dtype=torch.float64)) == [token]


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
