"""DecodeEngine in-process over a real kvstore and a tiny llama: greedy output equals
transformers alone and under continuous batching, write-back of completed blocks, cancel,
admission limits and prompt validation."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from decode.config import DecodeLimits
from decode.engine import DecodeEngine, EngineStopped, QueueFull, SequenceHandle
from decode.sequence import DecodeEvent, DecodeJob
from engine.role_core import EngineCore
from pantry.common.errors import InvalidRequest
from pantry.common.sampling import SamplingParams
from prefill.engine import PrefillEngine, PrefillJob
from tests.decode.engine_rig import (
    BLOCK,
    MAX_MODEL_LEN,
    VOCAB,
    block_object_bytes,
    hf_greedy,
    make_core,
    metric,
    pool_client,
    prompt,
)
from tests.kvstore.kv_helpers import wait_for

EVENT_TIMEOUT = 30.0

EngineFactory = Callable[..., DecodeEngine]


@pytest.fixture
def make_engine(tiny_llama: Path, pool_address: str) -> Iterator[EngineFactory]:
    engines: list[DecodeEngine] = []

    def make(limits: DecodeLimits | None = None, engine_id: str = "decode-0",
             **core_overrides: object) -> DecodeEngine:
        core = make_core(tiny_llama, pool_address, "decode", engine_id, **core_overrides)
        engine = DecodeEngine(core, limits)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
        assert not engine._thread.is_alive(), "decode loop did not stop"
        engine.core.close()


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          **kw)  # type: ignore[arg-type]


def decode_job(ids: tuple[int, ...], max_tokens: int, rid: str = "r", tenant: str = "",
               first_token: int | None = None) -> DecodeJob:
    return DecodeJob(request_id=rid, token_ids=ids, tenant=tenant, sampling=greedy(max_tokens),
                     first_token=first_token)


def collect(handle: SequenceHandle) -> list[DecodeEvent]:
    return list(handle.events(timeout=EVENT_TIMEOUT))


def tokens_of(events: list[DecodeEvent]) -> tuple[int, ...]:
    return tuple(t for e in events for t in e.token_ids)


def pool_blocks(core: EngineCore) -> list[float | None]:
    """pantry_pool_client_blocks_{hit,missed,rejected,stored}_total."""
    return [metric(core, f"pantry_pool_client_blocks_{kind}_total")
            for kind in ("hit", "missed", "rejected", "stored")]


def wait_idle(engine: DecodeEngine, free: int) -> None:
    alloc = engine.core.runner.allocator
    wait_for(lambda: engine.load() == (0, 0) and alloc.num_free == free, timeout=10,
             what="decode engine idle with every block free")


# ---- output equals transformers ------------------------------------------------------------

def test_single_sequence_matches_transformers(make_engine: EngineFactory,
                                              tiny_llama: Path) -> None:
    engine = make_engine()
    free = engine.core.runner.allocator.num_free
    ids = prompt(23, seed=11)
    events = collect(engine.submit(decode_job(ids, 10)))
    assert tokens_of(events) == hf_greedy(tiny_llama, ids, 10)
    assert [len(e.token_ids) for e in events] == [1] * 10
    assert [e.finish_reason for e in events] == [""] * 9 + ["length"]
    assert not any(e.error for e in events)
    # The first event reports where the prompt came from: nothing was pooled yet.
    assert (events[0].pool_tokens, events[0].computed_tokens) == (0, 23)
    wait_idle(engine, free)
    assert engine.core.counters().requests_total == 1


def test_metrics_of_one_sequence(make_engine: EngineFactory) -> None:
    engine = make_engine()
    core = engine.core
    free = core.runner.allocator.num_free
    collect(engine.submit(decode_job(prompt(23, seed=11), 10)))
    wait_idle(engine, free)
    counters = core.counters()
    assert metric(core, "pantry_engine_requests_total") == counters.requests_total == 1
    assert metric(core, "pantry_engine_computed_tokens_total") == 23
    assert metric(core, "pantry_engine_pool_tokens_total") == 0
    assert metric(core, "pantry_engine_busy_seconds_total") == counters.busy_seconds_total
    assert metric(core, "pantry_engine_time_to_first_token_seconds_count") == 1
    # Ten tokens: the first is timed from submit, the nine after it from the token before.
    assert metric(core, "pantry_engine_time_between_tokens_seconds_count") == 9
    # The prompt's only full block was missed; KV for 32 tokens (23 + 9) completes two blocks,
    # each written back as it filled.
    assert pool_blocks(core) == [0, 1, 0, 2]
    assert metric(core, "pantry_pool_client_read_seconds_count") == 1
    assert metric(core, "pantry_pool_client_write_seconds_count") == 2
    assert metric(core, "pantry_pool_client_read_bytes_total") == 0
    assert metric(core, "pantry_pool_client_written_bytes_total") == 2 * block_object_bytes(core)
    assert metric(core, "pantry_engine_kv_free_blocks") == free == core.runner.kv.num_blocks
    assert metric(core, "pantry_engine_kv_blocks") == core.runner.kv.num_blocks


def test_first_token_from_prefill_is_used(make_engine: EngineFactory, tiny_llama: Path,
                                          pool_address: str) -> None:
    ids = prompt(40, seed=12)
    expected = hf_greedy(tiny_llama, ids, 10)
    pcore = make_core(tiny_llama, pool_address, "prefill", "prefill-0")
    try:
        pre = PrefillEngine(pcore).prefill(PrefillJob("r", ids, "", greedy(10)))
    finally:
        pcore.close()
    assert pre.first_token == expected[0]

    assert pool_blocks(pcore) == [0, 2, 0, 3]  # both full blocks and the 8-token tail
    assert metric(pcore, "pantry_engine_time_to_first_token_seconds_count") == 1

    engine = make_engine()
    free = engine.core.runner.allocator.num_free
    events = collect(engine.submit(decode_job(ids, 10, first_token=pre.first_token)))
    assert tokens_of(events) == expected
    # The prefill engine stored both full blocks and the tail; decode pulls all three and
    # computes nothing of the prompt.
    assert (events[0].pool_tokens, events[0].computed_tokens) == (40, 0)
    wait_idle(engine, free)
    core = engine.core
    assert metric(core, "pantry_engine_pool_tokens_total") == 40
    assert metric(core, "pantry_engine_computed_tokens_total") == 0
    assert metric(core, "pantry_engine_prompt_tails_pulled_total") == 1
    # KV for 49 tokens: the third block (the tail, filled by output) is the only one written
    # back, under its full key.
    assert pool_blocks(core) == [3, 0, 0, 1]
    assert metric(core, "pantry_pool_client_read_bytes_total") == 3 * block_object_bytes(core)
    assert metric(core, "pantry_engine_time_between_tokens_seconds_count") == 9


def test_given_first_token_overrides_the_sampled_one(make_engine: EngineFactory,
                                                     tiny_llama: Path) -> None:
    ids = prompt(20, seed=13)
    own_first = hf_greedy(tiny_llama, ids, 1)[0]
    forced = 3 if own_first != 3 else 4
    engine = make_engine()
    out = tokens_of(collect(engine.submit(decode_job(ids, 6, first_token=forced))))
    assert out[0] == forced
    # Everything after continues from the forced token.
    assert out[1:] == hf_greedy(tiny_llama, (*ids, forced), 5)


def test_concurrent_sequences_each_match_their_own_transformers_output(
    make_engine: EngineFactory, tiny_llama: Path
) -> None:
    # Small chunks: long prompts fill over several steps while the short ones already decode.
    engine = make_engine(DecodeLimits(max_running=8, chunk_tokens=24, idle_chunk_tokens=24))
    free = engine.core.runner.allocator.num_free
    cases = [(prompt(n, seed=100 + n), m) for n, m in
             [(3, 12), (17, 9), (40, 15), (64, 7), (90, 11), (33, 1)]]
    expected = [hf_greedy(tiny_llama, ids, m) for ids, m in cases]
    handles = [engine.submit(decode_job(ids, m, rid=f"r{i}"))
               for i, (ids, m) in enumerate(cases)]
    got = [tokens_of(collect(h)) for h in handles]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"sequence {i} (prompt {len(cases[i][0])} tokens) diverged"
    wait_idle(engine, free)


def test_a_step_trace_has_one_line_per_step_with_its_batch(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    path = tmp_path / "steps.jsonl"
    engine = make_engine(DecodeLimits(max_running=2, chunk_tokens=16, idle_chunk_tokens=16,
                                      step_trace=str(path)))
    got = tokens_of(collect(engine.submit(decode_job(prompt(20, seed=31), 5))))
    assert len(got) == 5
    engine.stop()  # the loop closes the trace
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # The 20-token prompt in chunks of 16 and 4 (the first token), then a step per token.
    assert [line["tokens"] for line in lines] == [16, 4, 1, 1, 1, 1]
    assert [line["positions"] for line in lines] == [16, 20, 21, 22, 23, 24]
    assert {line["sequences"] for line in lines} == {1}
    assert {line["engine"] for line in lines} == {"decode-0"}
    assert all(line["wall_ms"] >= line["cpu_ms"] - 0.1 for line in lines)


def test_more_sequences_than_max_running_queue_and_still_match(
    make_engine: EngineFactory, tiny_llama: Path
) -> None:
    engine = make_engine(DecodeLimits(max_running=2, chunk_tokens=16, idle_chunk_tokens=16))
    free = engine.core.runner.allocator.num_free
    cases = [prompt(10 + 7 * i, seed=200 + i) for i in range(5)]
    handles = [engine.submit(decode_job(ids, 6, rid=f"q{i}")) for i, ids in enumerate(cases)]
    results: dict[int, tuple[int, ...]] = {}
    threads = [threading.Thread(target=lambda i=i, h=h: results.__setitem__(i,
                                tokens_of(collect(h))))
               for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=EVENT_TIMEOUT)
    for i, ids in enumerate(cases):
        assert results[i] == hf_greedy(tiny_llama, ids, 6)
    wait_idle(engine, free)


def test_stop_token_finishes_with_stop(make_engine: EngineFactory,
                                             tiny_llama: Path) -> None:
    ids = prompt(20, seed=14)
    expected = hf_greedy(tiny_llama, ids, 8)
    stop_at = expected[3]
    cut = expected.index(stop_at) + 1
    engine = make_engine()
    job = DecodeJob("s", ids, "", SamplingParams(max_tokens=8, ignore_eos=True,
                                                 stop_token_ids=(stop_at,)))
    events = collect(engine.submit(job))
    assert tokens_of(events) == expected[:cut]
    assert events[-1].finish_reason == "stop"


def test_eos_finishes_unless_ignored(make_engine: EngineFactory) -> None:
    engine = make_engine()
    free = engine.core.runner.allocator.num_free
    eos = engine.core.description.eos_token_ids[0]
    ids = prompt(12, seed=31)
    stop_job = DecodeJob("e", ids, "", SamplingParams(max_tokens=5), first_token=eos)
    events = collect(engine.submit(stop_job))
    assert [(e.token_ids, e.finish_reason) for e in events] == [((eos,), "stop")]
    ignore_job = DecodeJob("i", ids, "", SamplingParams(max_tokens=5, ignore_eos=True),
                           first_token=eos)
    events = collect(engine.submit(ignore_job))
    assert len(tokens_of(events)) == 5 and events[-1].finish_reason == "length"
    wait_idle(engine, free)


def test_seeded_sampling_is_reproducible(make_engine: EngineFactory) -> None:
    engine = make_engine()
    ids = prompt(15, seed=32)

    def sample(seed: int) -> tuple[int, ...]:
        job = DecodeJob("s", ids, "", SamplingParams(temperature=1.5, max_tokens=12,
                                                     ignore_eos=True, seed=seed))
        return tokens_of(collect(engine.submit(job)))

    a = sample(1234)
    assert sample(1234) == a
    assert any(sample(s) != a for s in (1, 2, 3))


# ---- the pool ------------------------------------------------------------------------------

def test_generation_writes_back_the_blocks_it_completes(make_engine: EngineFactory,
                                                        tiny_llama: Path) -> None:
    engine = make_engine()
    core: EngineCore = engine.core
    ids = prompt(20, seed=15)
    out = tokens_of(collect(engine.submit(decode_job(ids, 20))))
    assert out == hf_greedy(tiny_llama, ids, 20)
    # 40 tokens, the last never computed: KV for 39, so two full blocks, the second one made of
    # 4 prompt tokens and 12 generated ones.
    full = (*ids, *out)
    keys = core.addressing.block_keys(full, "")
    assert len(keys) == 2
    with pool_client(core.config.kv_master) as c:
        wait_for(lambda: c.exists(keys) == [True, True], what="written-back blocks visible")
        longer = core.addressing.block_keys((*full, *prompt(8, seed=16)), "")
        assert c.exists(longer) == [True, True, False]

    # A follow-up turn over prompt + output pulls both blocks and still matches transformers.
    follow = full[: 2 * BLOCK + 3]
    events = collect(engine.submit(decode_job(follow, 5, rid="turn2")))
    assert (events[0].pool_tokens, events[0].computed_tokens) == (32, 3)
    assert tokens_of(events) == hf_greedy(tiny_llama, follow, 5)


def test_written_back_blocks_are_tenant_scoped(make_engine: EngineFactory) -> None:
    engine = make_engine()
    core = engine.core
    ids = prompt(40, seed=17)
    collect(engine.submit(decode_job(ids, 2, tenant="alice")))
    core.flush_writes()  # write-back runs beside the loop
    with pool_client(core.config.kv_master) as c:
        assert c.exists(core.addressing.block_keys(ids, "alice")) == [True, True]
        assert c.exists(core.addressing.block_keys(ids, "bob")) == [False, False]
    bob = collect(engine.submit(decode_job(ids, 2, tenant="bob")))
    assert (bob[0].pool_tokens, bob[0].computed_tokens) == (0, 40)


# ---- cancel, limits, validation -------------------------------------------------------------

def test_cancel_running_sequence_frees_its_blocks(make_engine: EngineFactory) -> None:
    engine = make_engine()
    alloc = engine.core.runner.allocator
    free = alloc.num_free
    ids = prompt(30, seed=18)
    handle = engine.submit(decode_job(ids, MAX_MODEL_LEN - 30))
    events = handle.events(timeout=EVENT_TIMEOUT)
    first = next(events)
    assert first.token_ids and not first.finish_reason
    # Blocks grow with the output (exact counts: tests/decode/test_preemption.py).
    assert alloc.num_free < free
    assert metric(engine.core, "pantry_engine_kv_free_blocks") == alloc.num_free
    handle.cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled"
    assert not rest[-1].error
    wait_idle(engine, free)


def test_cancel_waiting_sequence_never_runs(make_engine: EngineFactory) -> None:
    engine = make_engine(DecodeLimits(max_running=1))
    free = engine.core.runner.allocator.num_free
    blocker = engine.submit(decode_job(prompt(10, seed=19), MAX_MODEL_LEN - 10, rid="blocker"))
    blocker_events = blocker.events(timeout=EVENT_TIMEOUT)
    next(blocker_events)
    queued = engine.submit(decode_job(prompt(10, seed=20), 5, rid="queued"))
    assert engine.load() == (1, 1)
    queued.cancel()
    blocker.cancel()
    assert list(blocker_events)[-1].finish_reason == "cancelled"
    assert collect(queued) == [DecodeEvent(finish_reason="cancelled")]
    wait_idle(engine, free)


def test_queue_full_when_max_waiting_reached(make_engine: EngineFactory) -> None:
    engine = make_engine(DecodeLimits(max_running=1, max_waiting=2))
    free = engine.core.runner.allocator.num_free
    running = engine.submit(decode_job(prompt(10, seed=21), MAX_MODEL_LEN - 10, rid="run"))
    running_events = running.events(timeout=EVENT_TIMEOUT)
    next(running_events)                      # admitted: the queue is empty again
    queued = [engine.submit(decode_job(prompt(10, seed=22 + i), 3, rid=f"w{i}"))
              for i in range(2)]
    assert engine.load() == (2, 1)
    assert metric(engine.core, "pantry_engine_waiting_requests") == 2
    assert metric(engine.core, "pantry_engine_running_requests") == 1
    with pytest.raises(QueueFull):
        engine.submit(decode_job(prompt(10, seed=30), 3, rid="refused"))
    assert engine.load() == (2, 1)
    running.cancel()
    list(running_events)
    for h in queued:
        assert collect(h)[-1].finish_reason == "length"
    wait_idle(engine, free)


@pytest.mark.parametrize(("tokens", "max_tokens", "field"), [
    ((), 4, "prompt"),
    ((5, VOCAB), 4, "prompt"),
    ((-1, 5), 4, "prompt"),
    (tuple(range(3, 3 + MAX_MODEL_LEN)), 1, "prompt"),
    (tuple(range(3, 3 + MAX_MODEL_LEN + 10)), 1, "prompt"),
    (tuple(range(3, 3 + 200)), MAX_MODEL_LEN - 199, "max_tokens"),
    ((5, 6, 7), MAX_MODEL_LEN, "max_tokens"),
])
def test_invalid_requests_are_rejected_naming_the_field(
    make_engine: EngineFactory, tokens: tuple[int, ...], max_tokens: int, field: str
) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest) as info:
        engine.submit(decode_job(tokens, max_tokens))
    assert info.value.field == field
    assert engine.load() == (0, 0)


def test_configured_max_model_len_limits_requests(make_engine: EngineFactory) -> None:
    engine = make_engine(max_model_len=64)
    assert engine.core.max_model_len == 64
    with pytest.raises(InvalidRequest) as info:
        engine.submit(decode_job(prompt(64, seed=33), 1))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequest) as info:
        engine.submit(decode_job(prompt(60, seed=33), 5))
    assert info.value.field == "max_tokens"
    assert len(tokens_of(collect(engine.submit(decode_job(prompt(60, seed=33), 4))))) == 4


@pytest.mark.parametrize("first_token", [VOCAB, -1])
def test_first_token_outside_vocabulary_is_rejected(make_engine: EngineFactory,
                                                    first_token: int) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest) as info:
        engine.submit(decode_job(prompt(5, seed=23), 3, first_token=first_token))
    assert info.value.field == "first_token"
    assert engine.load() == (0, 0)


def test_context_filled_to_the_last_position(make_engine: EngineFactory,
                                             tiny_llama: Path) -> None:
    ids = prompt(MAX_MODEL_LEN - 4, seed=24)
    engine = make_engine()
    out = tokens_of(collect(engine.submit(decode_job(ids, 4))))
    assert out == hf_greedy(tiny_llama, ids, 4)


def test_stop_fails_pending_sequences_with_an_error(make_engine: EngineFactory) -> None:
    engine = make_engine(DecodeLimits(max_running=1))
    running = engine.submit(decode_job(prompt(10, seed=25), MAX_MODEL_LEN - 10, rid="a"))
    events = running.events(timeout=EVENT_TIMEOUT)
    next(events)
    waiting = engine.submit(decode_job(prompt(10, seed=26), 3, rid="b"))
    engine.stop()
    assert list(events)[-1].error == "decode engine stopped"
    assert collect(waiting)[-1].error == "decode engine stopped"


def test_submit_after_stop_does_not_hang(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.stop()
    with pytest.raises(EngineStopped, match="stopping"):
        engine.submit(decode_job(prompt(5, seed=27), 2))


def test_engine_keeps_serving_after_a_batch(make_engine: EngineFactory, tiny_llama: Path) -> None:
    # Sequential requests reuse freed blocks: the second must not see the first one's KV.
    engine = make_engine()
    a, b = prompt(30, seed=28), prompt(30, seed=29)
    assert tokens_of(collect(engine.submit(decode_job(a, 5)))) == hf_greedy(tiny_llama, a, 5)
    assert tokens_of(collect(engine.submit(decode_job(b, 5)))) == hf_greedy(tiny_llama, b, 5)


def test_prompt_takes_one_pass_while_nothing_decodes(make_engine: EngineFactory,
                                                     tiny_llama: Path) -> None:
    """chunk_tokens protects running sequences' steps; with none running, a prompt takes
    idle_chunk_tokens at once. Recorded from the real runner's calls."""
    engine = make_engine(DecodeLimits(chunk_tokens=16, idle_chunk_tokens=64))
    runner = engine.core.runner
    step = runner.step
    sizes: list[list[int]] = []
    runner.step = lambda seqs: (sizes.append([len(s.token_ids) for s in seqs]),  # type: ignore[method-assign]
                                step(seqs))[1]
    alone = prompt(40, seed=19)
    assert tokens_of(collect(engine.submit(decode_job(alone, 2, rid="a")))) == hf_greedy(
        tiny_llama, alone, 2)
    assert sizes == [[40], [1]]
    # A 100-token prompt alone: 64 at once, then the 36 left; its first token is sampled from
    # the second pass.
    sizes.clear()
    long = prompt(100, seed=20)
    assert tokens_of(collect(engine.submit(decode_job(long, 2, rid="b")))) == hf_greedy(
        tiny_llama, long, 2)
    assert sizes == [[64], [36], [1]]
