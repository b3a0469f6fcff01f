"""Placement and admission, pure: exact choices on hand-made engines, prefixes and queues."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conductor.perf_model import DecodeModel, PrefillModel, QueueLedger, TransferModel
from conductor.placement import (
    CachePolicy,
    Choice,
    DecodeView,
    LoadPolicy,
    PantryPolicy,
    PrefillView,
    PrefixMatch,
    RandomPolicy,
    RequestShape,
    RoundRobinPolicy,
    Slo,
    make_policy,
    predict_ttft,
    rejection,
)
from conductor.scheduler import EngineState, Placement, Scheduler, peer_scaled, prefix_match
from pantry.common.engine_info import EngineDescription, EngineLoad
from pantry.common.wire import info_from_proto, info_to_proto

MODEL = PrefillModel(per_token_s=0.01)
XFER = TransferModel({"local": 0.001, "remote": 0.01, "pool": 0.01})
REQ = RequestShape(prompt_tokens=100, max_tokens=10, block_size=10)


def pv(name: str, queue: float = 0.0, up: bool = True) -> PrefillView:
    return PrefillView(name, queue, MODEL, up)


def test_predicted_ttft_is_queue_compute_and_transfer_by_tier() -> None:
    match = PrefixMatch(("remote",) * 6, {"a": 4})
    # a: 4 local blocks (0.004) + 2 remote (0.02) + 40 computed tokens (0.4) + queue 1.0
    assert predict_ttft(REQ, match, pv("a", 1.0), XFER) == pytest.approx(1.424)
    # b: 6 remote blocks + 40 tokens
    assert predict_ttft(REQ, match, pv("b"), XFER) == pytest.approx(0.46)
    # a fully cached prompt still computes its last token
    full = PrefixMatch(("remote",) * 10)
    assert predict_ttft(REQ, full, pv("b"), XFER) == pytest.approx(0.1 + 0.01)


def test_pantry_spreads_a_hot_prefix_when_its_holder_is_busy() -> None:
    match = PrefixMatch(("remote",) * 8, {"hot": 8})
    # Idle holder: the local prefix wins (0.008 + 0.2 vs 0.08 + 0.2).
    assert PantryPolicy().prefill(REQ, match, [pv("cold"), pv("hot")], XFER) == Choice(
        "hot", pytest.approx(0.208))
    # Holder queued 0.5 s: pulling the prefix from the pool elsewhere is sooner.
    assert PantryPolicy().prefill(REQ, match, [pv("cold"), pv("hot", 0.5)], XFER) == Choice(
        "cold", pytest.approx(0.28))


def test_cache_policy_follows_local_prefix_load_policy_follows_queue() -> None:
    match = PrefixMatch(("remote",) * 8, {"hot": 8})
    engines = [pv("cold", 0.1), pv("hot", 0.5)]
    # cache: cold = 0.1 + 1.0 (no local prefix), hot = 0.5 + 0.008 + 0.2
    assert CachePolicy().prefill(REQ, match, engines, XFER) == Choice("hot", pytest.approx(0.708))
    assert LoadPolicy().prefill(REQ, match, engines, XFER) == Choice("cold", pytest.approx(0.38))


def test_round_robin_and_random_skip_engines_that_are_down() -> None:
    engines = [pv("a"), pv("b", up=False), pv("c")]
    rr = RoundRobinPolicy()
    picks = [rr.prefill(REQ, PrefixMatch(), engines, XFER) for _ in range(4)]
    assert [p.engine_id for p in picks if p] == ["a", "c", "a", "c"]
    rnd = RandomPolicy(seed=0)
    assert [rnd.prefill(REQ, PrefixMatch(), engines, XFER).engine_id  # type: ignore[union-attr]
            for _ in range(6)] == ["c", "c", "a", "c", "c", "c"]
    assert LoadPolicy().prefill(REQ, PrefixMatch(), [pv("x", up=False)], XFER) is None


def dv(name: str, running: int, free: int | None = 100) -> DecodeView:
    from conductor.perf_model import DecodeModel
    return DecodeView(name, running, 0, free, 16, DecodeModel(fixed_s=0.02, per_seq_s=0.001))


def test_decode_goes_where_it_fits_then_to_the_lowest_predicted_tbt() -> None:
    req = RequestShape(40, 4, 16)  # 44 tokens: 3 blocks of 16
    engines = [dv("tight", 0, free=2), dv("busy", 5), dv("calm", 1)]
    assert PantryPolicy().decode(req, engines) == Choice("calm", pytest.approx(0.022))
    assert LoadPolicy().decode(req, engines) == Choice("calm", pytest.approx(0.022))
    # nothing fits: the least loaded of all
    assert PantryPolicy().decode(req, [dv("a", 3, 1), dv("b", 2, 1)]) == Choice(
        "b", pytest.approx(0.023))


def test_admission_refuses_on_either_slo() -> None:
    slo = Slo(ttft_s=1.0, tbt_s=0.05)
    assert rejection(slo, Choice("p", 1.0), Choice("d", 0.05)) == ""
    assert rejection(slo, Choice("p", 1.01), Choice("d", 0.01)) == "ttft"
    assert rejection(slo, Choice("p", 0.5), Choice("d", 0.06)) == "tbt"
    assert rejection(Slo(), Choice("p", 1e9), Choice("d", 1e9)) == ""


def test_policies_by_name() -> None:
    assert [make_policy(n).name for n in ("random", "round_robin", "load", "cache", "pantry")
            ] == ["random", "round_robin", "load", "cache", "pantry"]
    with pytest.raises(ValueError, match="unknown placement policy 'best'"):
        make_policy("best")


def test_ledger_counts_the_queue_once() -> None:
    """Three requests sent at t=0 to an idle FIFO engine, each really taking 1 s: the ledger
    measures each service as 1 s, not 1, 2 and 3 s as latency would."""
    led = QueueLedger()
    assert [led.dispatch(0.0, 1.0) for _ in range(3)] == [0.0, 1.0, 2.0]
    assert led.queue_s(0.5) == 2.5
    assert [led.complete(t) for t in (1.0, 2.0, 3.0)] == [1.0, 1.0, 1.0]
    assert led.queue_s(3.0) == 0.0


def test_prefill_model_first_observation_replaces_then_ewma() -> None:
    m = PrefillModel(per_token_s=1e-3)
    m.observe(100, 0, 0.5)       # base 0.1 s: scale 5
    assert m.scale == 5.0
    m.observe(100, 0, 0.1)       # sample 1: 0.7 * 5 + 0.3 * 1
    assert m.scale == pytest.approx(3.8)
    m.observe(0, 0, 1.0)         # nothing computed: ignored
    assert (m.scale, m.observed) == (pytest.approx(3.8), 2)


# ---- the live driver ---------------------------------------------------------------------

def info(name: str, role: str = "prefill", block_size: int = 16) -> EngineDescription:
    return EngineDescription(role=role, engine_id=name, model_id="tiny", fingerprint="fp",
                             block_size=block_size, vocab_size=512, max_model_len=256,
                             eos_token_ids=(2,), hash_seed=0)


def load(free: int, waiting: int = 0) -> EngineLoad:
    return EngineLoad(waiting=waiting, running=0, free_blocks=free, total_blocks=100,
                      requests_total=0, computed_tokens_total=0, pool_tokens_total=0,
                      busy_seconds_total=0.0)


def test_scheduler_places_by_predicted_queue_and_learns_service_time() -> None:
    a = EngineState(client="a", info=info("a"))
    b = EngineState(client="b", info=info("b"))
    sched: Scheduler[str] = Scheduler()
    first = sched.choose_prefill([a, b], 64, (), now=0.0)
    assert first == Placement(a, pytest.approx(64 * 2e-3))
    sched.dispatched(a, first, now=0.0)  # type: ignore[arg-type]
    second = sched.choose_prefill([a, b], 64, (), now=0.0)
    assert second is not None and second.engine is b
    sched.completed(a, computed_tokens=64, prefix_tokens=0, now=0.256)
    assert a.prefill_model.scale == pytest.approx(2.0)
    assert a.ledger.queue_s(0.256) == 0.0


def test_scheduler_ttft_slo_and_engines_down() -> None:
    st = EngineState(client="a", info=info("a"))
    strict: Scheduler[str] = Scheduler(ttft_slo_s=0.5)
    assert strict.misses_slo(Placement(st, 0.51))
    assert not strict.misses_slo(Placement(st, 0.5))
    assert not Scheduler[str]().misses_slo(Placement(st, 1e9))
    down = EngineState(client="d", info=info("d"), up=False)
    assert Scheduler[str]().choose_prefill([down], 10, (), now=0.0) is None
    assert Scheduler[str]().choose_prefill([], 10, (), now=0.0) is None


def test_scheduler_decode_fit_uses_each_engines_block_size() -> None:
    small = EngineState(client="small", info=info("small", "decode", 8), load=load(free=4))
    big = EngineState(client="big", info=info("big", "decode", 32), load=load(free=2, waiting=9))
    assert Scheduler[str]().choose_decode([small, big], 40, 30) is big
    calm = EngineState(client="calm", info=info("calm", "decode"), load=load(50, waiting=1))
    busy = EngineState(client="busy", info=info("busy", "decode"), load=load(50, waiting=3))
    assert Scheduler[str]().choose_decode([busy, calm], 16, 10) is calm
    assert Scheduler[str]().choose_decode([], 16, 10) is None


def test_engines_read_blocks_on_their_own_host_at_the_local_tier() -> None:
    a = EngineState(client="a", info=replace(info("a"), host_id="host-a"))
    b = EngineState(client="b", info=replace(info("b"), host_id="host-b"))
    old = EngineState(client="old", info=info("old"))   # names no host
    engines = [a, b, old]
    # Blocks 0-1 on host-b, block 2 on host-a: b reads 2 leading blocks locally, a none (its
    # block is not a leading one), the engine without a host reads all 3 from the pool.
    assert prefix_match(engines, ("host-b", "host-b", "host-a")) == PrefixMatch(
        ("pool",) * 3, {"1": 2})
    assert prefix_match(engines, ("host-a",)) == PrefixMatch(("pool",), {"0": 1})
    assert prefix_match(engines, ()) == PrefixMatch((), {})
    # Equal queues and models: the engine beside the blocks wins on transfer time (the default
    # transfer model reads a local block for free, a pool block at 2e-4 s).
    sched: Scheduler[str] = Scheduler()
    on_b = sched.choose_prefill(engines, 40, ("host-b", "host-b"), now=0.0)
    assert on_b == Placement(b, pytest.approx(8 * 2e-3))   # 40 - 2 x 16 tokens computed
    on_a = sched.choose_prefill(engines, 40, ("host-a", "host-a"), now=0.0)
    assert on_a is not None and on_a.engine is a


def test_engine_info_carries_salt_and_host_over_the_wire() -> None:
    d = replace(info("a"), salt="tenant-x", host_id="node-7/boot")
    assert info_from_proto(info_to_proto(d)) == d
    assert info_from_proto(info_to_proto(info("a"))) == info("a")


def test_an_engine_not_measured_yet_is_predicted_like_its_measured_peers() -> None:
    """A tiny model's decode steps take a millisecond, far under the CPU-class guess: once one
    engine is measured, the other (still on the guess) must still get requests as the first
    one's batch grows, and the same holds for prefill."""
    a = EngineState(client="a", info=info("a", "decode"))
    b = EngineState(client="b", info=info("b", "decode"))
    sched: Scheduler[str] = Scheduler()
    sched.decoded(a, batch=1, tokens=10, seconds=0.01)      # 1 ms a step against 21 ms guessed
    assert a.decode_model.scale == pytest.approx(0.001 / 0.021)
    a.inflight_requests = 3
    choice = sched.decode_choice([a, b], 16, 10)
    assert choice is not None and choice[0] is b
    assert choice[1] == pytest.approx(0.001)                 # b at a's scale, batch of one
    assert b.decode_model.scale == 1.0 and b.decode_model.observed == 0  # b's own model kept
    p, q = EngineState(client="p", info=info("p")), EngineState(client="q", info=info("q"))
    sched.dispatched(p, Placement(p, 0.0), now=0.0)
    sched.completed(p, computed_tokens=64, prefix_tokens=0, now=0.0128)  # 0.2 ms a token
    sched.dispatched(p, Placement(p, 0.02), now=1.0)                    # p busy for 20 ms
    placed = sched.choose_prefill([p, q], 64, (), now=1.0)
    assert placed == Placement(q, pytest.approx(64 * 2e-4))


def test_peer_scaling_keeps_measured_models_and_needs_a_measurement() -> None:
    guess, fast, slow = DecodeModel(), DecodeModel(scale=0.1, observed=3), DecodeModel(scale=0.3,
                                                                                    observed=1)
    assert peer_scaled([guess, guess]) == [guess, guess]
    assert peer_scaled([fast, guess, slow]) == [fast, DecodeModel(scale=0.3), slow]
    assert peer_scaled([fast, guess]) == [fast, DecodeModel(scale=0.1)]
