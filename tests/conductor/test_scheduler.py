"""Placement: lowest predicted TTFT for prefill, most headroom for decode, SLO rejection."""

from __future__ import annotations

import pytest

from conductor.scheduler import (
    EWMA_WEIGHT,
    INITIAL_SECONDS_PER_TOKEN,
    SECONDS_PER_CACHED_BLOCK,
    EngineState,
    Placement,
    Scheduler,
)
from pantry.common.engine_info import EngineDescription, EngineLoad


def info(name: str, role: str = "prefill", block_size: int = 16) -> EngineDescription:
    return EngineDescription(role=role, engine_id=name, model_id="tiny",
                      fingerprint="fp", block_size=block_size, vocab_size=512,
                      max_model_len=256, eos_token_ids=(2,), hash_seed=0)


def load(free: int, waiting: int = 0, total: int = 100) -> EngineLoad:
    return EngineLoad(waiting=waiting, running=0, free_blocks=free, total_blocks=total,
                      requests_total=0, computed_tokens_total=0, pool_tokens_total=0,
                      busy_seconds_total=0.0)


def engine(name: str, role: str = "prefill", **kw: object) -> EngineState[str]:
    return EngineState(client=name, info=info(name, role), **kw)  # type: ignore[arg-type]


# ---- prefill ------------------------------------------------------------------------------

def test_predicted_ttft_formula() -> None:
    st = engine("a", inflight_tokens=100, seconds_per_token=0.01)
    got = Scheduler().predict_ttft(st, uncached=50, cached_blocks=3)
    assert got == pytest.approx(100 * 0.01 + 50 * 0.01 + 3 * SECONDS_PER_CACHED_BLOCK)


def test_choose_prefill_prefers_fewer_inflight_tokens() -> None:
    busy = engine("busy", inflight_tokens=500)
    idle = engine("idle", inflight_tokens=10)
    for order in ([busy, idle], [idle, busy]):
        placement = Scheduler().choose_prefill(order, uncached=64, cached_blocks=0)
        assert placement is not None
        assert placement.engine.client == "idle"
        assert placement.predicted_ttft_s == pytest.approx(74 * INITIAL_SECONDS_PER_TOKEN)


def test_choose_prefill_prefers_faster_engine() -> None:
    slow = engine("slow", seconds_per_token=4e-3)
    fast = engine("fast", seconds_per_token=1e-3)
    for order in ([slow, fast], [fast, slow]):
        placement = Scheduler().choose_prefill(order, uncached=100, cached_blocks=2)
        assert placement is not None
        assert placement.engine.client == "fast"
        assert placement.predicted_ttft_s == pytest.approx(0.1 + 2 * SECONDS_PER_CACHED_BLOCK)


def test_fast_but_loaded_engine_loses_to_slow_idle_one() -> None:
    fast_loaded = engine("fast", seconds_per_token=1e-3, inflight_tokens=1000)  # 1.0 + 0.1
    slow_idle = engine("slow", seconds_per_token=5e-3)                          # 0.5
    placement = Scheduler().choose_prefill([fast_loaded, slow_idle], uncached=100,
                                           cached_blocks=0)
    assert placement is not None and placement.engine.client == "slow"


def test_choose_prefill_skips_engines_that_are_down() -> None:
    down = engine("down", up=False, seconds_per_token=1e-6)
    up = engine("up", inflight_tokens=10_000)
    placement = Scheduler().choose_prefill([down, up], uncached=10, cached_blocks=0)
    assert placement is not None and placement.engine.client == "up"


def test_choose_prefill_none_when_nothing_is_up() -> None:
    sched: Scheduler[str] = Scheduler()
    assert sched.choose_prefill([], uncached=10, cached_blocks=0) is None
    assert sched.choose_prefill([engine("a", up=False), engine("b", up=False)], 10, 0) is None


def test_misses_slo() -> None:
    st = engine("a")
    strict: Scheduler[str] = Scheduler(ttft_slo_s=0.5)
    assert strict.misses_slo(Placement(st, 0.51))
    assert not strict.misses_slo(Placement(st, 0.5))
    assert not strict.misses_slo(Placement(st, 0.1))
    no_slo: Scheduler[str] = Scheduler(ttft_slo_s=0.0)
    assert not no_slo.misses_slo(Placement(st, 1e9))


def test_observe_prefill_first_sample_replaces_the_guess_then_ewma() -> None:
    st = engine("a")
    assert st.seconds_per_token == INITIAL_SECONDS_PER_TOKEN
    Scheduler.observe_prefill(st, computed_tokens=100, seconds=0.5)      # 5e-3
    assert st.seconds_per_token == pytest.approx(5e-3, abs=0, rel=1e-12)
    assert st.observed == 1
    Scheduler.observe_prefill(st, computed_tokens=200, seconds=0.2)      # 1e-3
    assert EWMA_WEIGHT == 0.3
    assert st.seconds_per_token == pytest.approx(0.7 * 5e-3 + 0.3 * 1e-3, rel=1e-12)  # 3.8e-3
    assert st.observed == 2
    Scheduler.observe_prefill(st, computed_tokens=10, seconds=0.1)       # 1e-2
    assert st.seconds_per_token == pytest.approx(0.7 * 3.8e-3 + 0.3 * 1e-2, rel=1e-12)
    assert st.observed == 3


@pytest.mark.parametrize(("tokens", "seconds"), [(0, 1.0), (-5, 1.0), (10, 0.0), (10, -1.0)])
def test_observe_prefill_ignores_empty_samples(tokens: int, seconds: float) -> None:
    st = engine("a")
    Scheduler.observe_prefill(st, computed_tokens=tokens, seconds=seconds)
    assert st.seconds_per_token == INITIAL_SECONDS_PER_TOKEN
    assert st.observed == 0


# ---- decode -------------------------------------------------------------------------------

def test_choose_decode_prefers_engine_whose_free_blocks_fit() -> None:
    # 40 tokens on 16-token blocks need 3 blocks.
    tight = engine("tight", "decode", load=load(free=2))
    roomy = engine("roomy", "decode", load=load(free=3, waiting=7), inflight_requests=4)
    for order in ([tight, roomy], [roomy, tight]):
        assert Scheduler().choose_decode(order, tokens_reserved=40) is roomy


def test_choose_decode_least_busy_among_those_that_fit() -> None:
    a = engine("a", "decode", load=load(free=50, waiting=3), inflight_requests=1)   # busy 4
    b = engine("b", "decode", load=load(free=50, waiting=0), inflight_requests=2)   # busy 2
    c = engine("c", "decode", load=load(free=50, waiting=1), inflight_requests=2)   # busy 3
    assert Scheduler().choose_decode([a, b, c], tokens_reserved=16) is b


def test_choose_decode_unknown_load_counts_as_fitting() -> None:
    unknown = engine("unknown", "decode", inflight_requests=1)
    full = engine("full", "decode", load=load(free=0))
    assert Scheduler().choose_decode([full, unknown], tokens_reserved=16) is unknown


def test_choose_decode_falls_back_to_least_busy_when_nothing_fits() -> None:
    a = engine("a", "decode", load=load(free=1, waiting=5))
    b = engine("b", "decode", load=load(free=1, waiting=2))
    assert Scheduler().choose_decode([a, b], tokens_reserved=100) is b


def test_choose_decode_uses_each_engines_block_size() -> None:
    small = EngineState(client="small", info=info("small", "decode", block_size=8),
                        load=load(free=4))   # 40 tokens need 5 blocks of 8: does not fit
    big = EngineState(client="big", info=info("big", "decode", block_size=32),
                      load=load(free=2, waiting=9))  # 40 tokens need 2 blocks of 32: fits
    assert Scheduler().choose_decode([small, big], tokens_reserved=40) is big


def test_choose_decode_exact_fit_counts() -> None:
    exact = engine("exact", "decode", load=load(free=2, waiting=3))
    short = engine("short", "decode", load=load(free=1))
    assert Scheduler().choose_decode([short, exact], tokens_reserved=32) is exact


def test_choose_decode_skips_down_engines_and_none_when_all_down() -> None:
    down = engine("down", "decode", up=False, load=load(free=100))
    up = engine("up", "decode", load=load(free=0, waiting=10))
    assert Scheduler().choose_decode([down, up], tokens_reserved=16) is up
    assert Scheduler().choose_decode([down], tokens_reserved=16) is None
    assert Scheduler().choose_decode([], tokens_reserved=16) is None
