"""PrefillEngine in-process over a real kvstore and a tiny llama, against transformers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.block_keys import KeyChain
from engine.role_core import EngineCore
from pantry.common.errors import InvalidRequest
from pantry.common.sampling import SamplingParams
from prefill.config import PrefillLimits
from prefill.engine import PrefillEngine, PrefillJob, PrefillStopped
from tests.decode.engine_rig import (
    BLOCK,
    MAX_MODEL_LEN,
    block_object_bytes,
    hf_greedy,
    make_core,
    metric,
    pool_client,
    prompt,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture
def core(tiny_llama: Path, pool_address: str) -> Iterator[EngineCore]:
    core = make_core(tiny_llama, pool_address, "prefill", "prefill-0")
    yield core
    core.close()


def job(tokens: tuple[int, ...], tenant: str = "", rid: str = "r",
        sampling: SamplingParams = GREEDY) -> PrefillJob:
    return PrefillJob(request_id=rid, token_ids=tokens, tenant=tenant, sampling=sampling)


def pool_keys(core: EngineCore, tokens: tuple[int, ...], tenant: str = "") -> list[str]:
    """The keys of the prompt's full blocks, then its tail key when it has a partial block."""
    chain = KeyChain(core.addressing.hasher(tenant), tokens)
    tail = chain.tail_key(tokens)
    return chain.keys + ([tail] if tail is not None else [])


def tails_stored(core: EngineCore) -> float | None:
    return metric(core, "pantry_engine_prompt_tails_stored_total")


def test_miss_then_hit(core: EngineCore, tiny_llama: Path) -> None:
    engine = PrefillEngine(core)
    ids = prompt(40, seed=1)
    expected_first = hf_greedy(tiny_llama, ids, 1)[0]
    free = core.runner.allocator.num_free

    first = engine.prefill(job(ids))
    assert first.first_token == expected_first
    assert (first.pool_tokens, first.computed_tokens, first.stored_blocks) == (0, 40, 2)
    core.flush_writes()  # the first token came back before the blocks were written
    assert core.runner.allocator.num_free == free

    keys = pool_keys(core, ids)
    assert len(keys) == 3  # two full blocks and the 8-token tail
    with pool_client(core.config.kv_master) as c:
        assert c.exists(keys) == [True, True, True]

    # The same prompt again: both full blocks (32 tokens) come from this engine's cache; the
    # 8-token tail is computed (its last token's logits are needed anyway) and put again.
    second = engine.prefill(job(ids, rid="r2"))
    assert second.first_token == expected_first
    assert (second.pool_tokens, second.computed_tokens, second.stored_blocks) == (32, 8, 2)
    core.flush_writes()
    assert core.runner.allocator.num_free == free

    counters = core.counters()
    assert (counters.requests_total, counters.computed_tokens_total,
            counters.pool_tokens_total) == (2, 48, 32)
    assert counters.busy_seconds_total > 0
    assert engine.waiting == 0


def test_metrics_count_a_miss_then_a_hit(core: EngineCore) -> None:
    engine = PrefillEngine(core)
    ids = prompt(40, seed=1)
    engine.prefill(job(ids))
    engine.prefill(job(ids, rid="r2"))
    core.flush_writes()

    def m(name: str) -> float | None:
        return metric(core, name)

    # The Load RPC's counters are these series, read back.
    counters = core.counters()
    assert m("pantry_engine_requests_total") == counters.requests_total == 2
    assert m("pantry_engine_computed_tokens_total") == counters.computed_tokens_total == 48
    assert m("pantry_engine_pool_tokens_total") == counters.pool_tokens_total == 32
    assert m("pantry_engine_busy_seconds_total") == counters.busy_seconds_total
    assert m("pantry_engine_time_to_first_token_seconds_count") == 2
    assert m("pantry_engine_time_between_tokens_seconds_count") == 0
    assert (m("pantry_engine_waiting_requests"), m("pantry_engine_running_requests")) == (0, 0)
    assert core.runner.kv.num_blocks == 128
    assert (m("pantry_engine_kv_free_blocks"), m("pantry_engine_kv_blocks")) == (128, 128)
    # First prefill: both blocks missed, computed and stored with the tail. Second: both still
    # held by this engine (its prefix cache), so the pool is not read; the tail, computed again,
    # is put again (the pool answers that it holds it: counted as stored).
    pool = "pantry_pool_client_"
    assert [m(f"{pool}blocks_{kind}_total") for kind in ("hit", "missed", "rejected", "stored")
            ] == [0, 2, 0, 4]
    assert (m(f"{pool}read_seconds_count"), m(f"{pool}write_seconds_count")) == (1, 2)
    obj = block_object_bytes(core)  # a tail object is a block-sized object like any other
    assert (m(f"{pool}read_bytes_total"), m(f"{pool}written_bytes_total")) == (0, 4 * obj)
    assert m("pantry_engine_local_hit_blocks_total") == 2
    assert m("pantry_engine_kv_cached_blocks") == 2  # the tail is never indexed here
    assert tails_stored(core) == 2


def test_partial_hit_resumes_after_the_shared_prefix(core: EngineCore, tiny_llama: Path) -> None:
    engine = PrefillEngine(core)
    base = prompt(40, seed=2)
    engine.prefill(job(base))
    # Shares the first block only; the second block differs in its last token.
    other = base[:BLOCK] + prompt(BLOCK + 5, seed=3)
    out = engine.prefill(job(other))
    assert out.first_token == hf_greedy(tiny_llama, other, 1)[0]
    assert (out.pool_tokens, out.computed_tokens, out.stored_blocks) == (BLOCK, 21, 2)


def test_exact_block_multiple_prompt_recomputes_only_its_last_token(
    core: EngineCore, tiny_llama: Path
) -> None:
    engine = PrefillEngine(core)
    ids = prompt(2 * BLOCK, seed=4)
    first = engine.prefill(job(ids))
    assert (first.pool_tokens, first.computed_tokens, first.stored_blocks) == (0, 32, 2)
    again = engine.prefill(job(ids))
    assert (again.pool_tokens, again.computed_tokens, again.stored_blocks) == (31, 1, 2)
    assert again.first_token == first.first_token == hf_greedy(tiny_llama, ids, 1)[0]


def test_prompt_shorter_than_a_block_stores_only_its_tail(core: EngineCore,
                                                          tiny_llama: Path) -> None:
    engine = PrefillEngine(core)
    ids = prompt(5, seed=5)
    for _ in range(2):
        out = engine.prefill(job(ids))
        assert (out.pool_tokens, out.computed_tokens, out.stored_blocks) == (0, 5, 0)
        assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
    core.flush_writes()
    (tail,) = pool_keys(core, ids)
    assert tail == core.addressing.hasher("").tail_key(None, ids)
    with pool_client(core.config.kv_master) as c:
        assert c.exists([tail]) == [True]
    assert tails_stored(core) == 2
    assert metric(core, "pantry_engine_kv_cached_blocks") == 0
    assert core.runner.allocator.num_free == core.runner.kv.num_blocks


def test_tail_is_stored_only_when_the_prompt_has_one(core: EngineCore) -> None:
    engine = PrefillEngine(core)
    exact = prompt(2 * BLOCK, seed=14)
    engine.prefill(job(exact))
    core.flush_writes()
    assert tails_stored(core) == 0
    assert metric(core, "pantry_pool_client_blocks_stored_total") == 2
    longer = (*exact, *prompt(BLOCK - 1, seed=15))  # the same two blocks and a 15-token tail
    out = engine.prefill(job(longer))
    assert (out.pool_tokens, out.computed_tokens, out.stored_blocks) == (32, 15, 2)
    core.flush_writes()
    assert tails_stored(core) == 1
    keys = pool_keys(core, longer)
    assert keys[:2] == pool_keys(core, exact) and len(keys) == 3
    with pool_client(core.config.kv_master) as c:
        assert c.exists(keys) == [True, True, True]
    assert metric(core, "pantry_pool_client_blocks_stored_total") == 3
    assert metric(core, "pantry_engine_kv_cached_blocks") == 2


def test_chunked_prefill_gives_the_same_first_token(core: EngineCore, tiny_llama: Path) -> None:
    ids = prompt(70, seed=6)
    out = PrefillEngine(core, PrefillLimits(chunk_tokens=16)).prefill(job(ids))
    assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
    assert (out.pool_tokens, out.computed_tokens, out.stored_blocks) == (0, 70, 4)


def test_tenants_do_not_share_blocks(core: EngineCore) -> None:
    engine = PrefillEngine(core)
    ids = prompt(48, seed=8)
    engine.prefill(job(ids, tenant="alice"))
    bob = engine.prefill(job(ids, tenant="bob"))
    assert (bob.pool_tokens, bob.computed_tokens) == (0, 48)
    alice = engine.prefill(job(ids, tenant="alice"))
    assert (alice.pool_tokens, alice.computed_tokens) == (47, 1)


def test_blocks_stored_by_one_engine_are_used_by_another(
    core: EngineCore, tiny_llama: Path, pool_address: str
) -> None:
    ids = prompt(48, seed=9)
    PrefillEngine(core).prefill(job(ids))
    core.flush_writes()
    other_core = make_core(tiny_llama, pool_address, "prefill", "prefill-1")
    try:
        out = PrefillEngine(other_core).prefill(job(ids))
        assert (out.pool_tokens, out.computed_tokens) == (47, 1)
        assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
    finally:
        other_core.close()


@pytest.mark.parametrize(("tokens", "max_tokens", "field"), [
    ((), 1, "prompt"),
    ((5, 512), 1, "prompt"),
    ((5, -1), 1, "prompt"),
    (tuple(range(3, 3 + MAX_MODEL_LEN)), 1, "prompt"),
    (tuple(range(3, 3 + MAX_MODEL_LEN - 1)), 2, "max_tokens"),
])
def test_invalid_prompts_are_rejected_without_touching_state(
    core: EngineCore, tokens: tuple[int, ...], max_tokens: int, field: str
) -> None:
    engine = PrefillEngine(core)
    free = core.runner.allocator.num_free
    with pytest.raises(InvalidRequest) as info:
        engine.prefill(job(tokens, sampling=SamplingParams(max_tokens=max_tokens)))
    assert info.value.field == field
    assert core.runner.allocator.num_free == free
    assert engine.waiting == 0
    assert core.counters().requests_total == 0
    assert metric(core, "pantry_engine_time_to_first_token_seconds_count") == 0
    assert metric(core, "pantry_pool_client_read_seconds_count") == 0


def test_longest_prompt_that_fits_is_served(core: EngineCore, tiny_llama: Path) -> None:
    ids = prompt(MAX_MODEL_LEN - 1, seed=10)
    out = PrefillEngine(core).prefill(job(ids, sampling=SamplingParams(max_tokens=1)))
    assert out.computed_tokens == MAX_MODEL_LEN - 1
    assert out.stored_blocks == (MAX_MODEL_LEN - 1) // BLOCK
    assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]


def test_concurrent_prefills_are_serialised_and_correct(core: EngineCore,
                                                        tiny_llama: Path) -> None:
    engine = PrefillEngine(core, PrefillLimits(chunk_tokens=8))
    free = core.runner.allocator.num_free
    prompts = [prompt(20 + 9 * i, seed=40 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda ids: engine.prefill(job(ids)), prompts))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
        assert (out.pool_tokens, out.computed_tokens) == (0, len(ids))
    assert engine.waiting == 0
    core.flush_writes()
    assert core.runner.allocator.num_free == free
    assert core.counters().requests_total == 4


def test_first_token_returns_before_the_blocks_are_written(core: EngineCore,
                                                           tiny_llama: Path) -> None:
    engine = PrefillEngine(core)
    ids = prompt(40, seed=11)
    keys = pool_keys(core, ids)
    gate = threading.Event()
    # Holds the background writer (test-only reach into the core): the put queues behind it.
    core._writer.submit(gate.wait)
    try:
        out = engine.prefill(job(ids))
        assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
        assert out.stored_blocks == 2
        assert core.pending_writes == 1
        assert tails_stored(core) == 1
        # The prompt released its blocks, but the writer still holds all three, the
        # unindexed tail block included: none can be reused before it is written.
        assert core.runner.allocator.num_free == core.runner.kv.num_blocks - 3
        with pool_client(core.config.kv_master) as c:
            assert c.exists(keys) == [False, False, False]
    finally:
        gate.set()
    core.flush_writes()
    assert core.pending_writes == 0
    with pool_client(core.config.kv_master) as c:
        assert c.exists(keys) == [True, True, True]
    assert core.runner.allocator.num_free == core.runner.kv.num_blocks


def test_queued_prompts_share_token_budgeted_passes(core: EngineCore, tiny_llama: Path,
                                                   tmp_path: Path) -> None:
    """Three 40-token prompts under a 48-token budget: pass 1 computes p1 and 8 tokens of p2,
    pass 2 the rest of p2 and 16 of p3, pass 3 the rest of p3; each pass puts the blocks it
    completed and the tail of the prompt it finished (2 + 1, then 3 + 1, then 1 + 1). The step
    trace has one line per pass, with exactly that."""
    trace = tmp_path / "passes.jsonl"
    engine = PrefillEngine(core, PrefillLimits(chunk_tokens=48, step_trace=str(trace)),
                           background=False)
    prompts = [prompt(40, seed=20 + i) for i in range(3)]
    futures = [engine.submit(job(ids, rid=f"r{i}")) for i, ids in enumerate(prompts)]
    assert engine.load() == (3, 0)
    # Test-only reach into the loop: all three admitted and their (missing) prefixes pulled
    # before the first pass, so which tokens share a pass is exact.
    engine._admit()
    engine._puller.submit(lambda: None).result()
    assert engine.load() == (0, 3)
    loop = threading.Thread(target=engine.run)
    loop.start()
    try:
        outs = [f.result(timeout=30) for f in futures]
    finally:
        engine.stop()
        loop.join()
    for ids, out in zip(prompts, outs, strict=True):
        assert out.first_token == hf_greedy(tiny_llama, ids, 1)[0]
        assert (out.pool_tokens, out.computed_tokens, out.stored_blocks) == (0, 40, 2)
    pool = "pantry_pool_client_"
    assert metric(core, f"{pool}write_seconds_count") == 3
    assert metric(core, f"{pool}blocks_stored_total") == 9
    assert tails_stored(core) == 3
    assert core.runner.allocator.num_free == core.runner.kv.num_blocks
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [(line["sequences"], line["tokens"], line["positions"], line["stored"],
             line["finished"], line["waiting"]) for line in lines] == [
        (2, 48, 40 + 8, 3, 1, 0), (2, 48, 40 + 16, 4, 1, 0), (1, 24, 40, 2, 1, 0)]
    assert {line["engine"] for line in lines} == {"prefill-0"}
    assert {line["confined"] for line in lines} == {None}
    assert all(line["wall_ms"] >= line["cpu_ms"] - 0.1 for line in lines)


def test_stop_fails_queued_prompts(core: EngineCore) -> None:
    engine = PrefillEngine(core, background=False)
    future = engine.submit(job(prompt(20, seed=30)))
    engine.request_stop()
    engine.run()  # returns at once: stop was asked before any pass
    with pytest.raises(PrefillStopped):
        future.result(timeout=5)
    with pytest.raises(PrefillStopped):
        engine.submit(job(prompt(20, seed=31)))
    assert core.runner.allocator.num_free == core.runner.kv.num_blocks


def test_local_blocks_the_pool_evicted_are_written_again(core: EngineCore) -> None:
    engine = PrefillEngine(core)
    ids = prompt(40, seed=12)
    keys = core.addressing.block_keys(ids, "")
    engine.prefill(job(ids))
    core.flush_writes()
    with pool_client(core.config.kv_master) as c:
        assert c.remove(keys[1:]) == 1  # the pool evicted the second block
        again = engine.prefill(job(ids, rid="again"))
        # Both blocks held here: nothing computed but the tail, and the lost one stored again.
        assert (again.pool_tokens, again.computed_tokens, again.stored_blocks) == (32, 8, 2)
        core.flush_writes()
        assert c.exists(keys) == [True, True]
    # 2 blocks and the tail, then the lost block and the tail again.
    assert metric(core, "pantry_pool_client_blocks_stored_total") == 5
