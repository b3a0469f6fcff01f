"""DecodeEngine's engine-local prefix cache and its write-back: a repeat on the same engine neither
pulls nor computes its cached blocks, a block another sequence shares is never written, and the
blocks a step completes are written back in one batched put, beside the loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from decode.config import DecodeLimits
from decode.engine import DecodeEngine
from decode.sequence import DecodeEvent, DecodeJob
from engine.role_core import EngineCore
from pantry.common.sampling import SamplingParams
from tests.decode.engine_rig import hf_greedy, make_core, metric, pool_client, prompt


@pytest.fixture
def core(tiny_llama: Path, pool_address: str) -> Iterator[EngineCore]:
    core = make_core(tiny_llama, pool_address, "decode", "decode-0")
    yield core
    core.close()


def job(ids: tuple[int, ...], max_tokens: int, rid: str = "r") -> DecodeJob:
    return DecodeJob(request_id=rid, token_ids=ids, tenant="",
                     sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                             ignore_eos=True))


def run_to_end(engine: DecodeEngine, jobs: list[DecodeJob]) -> list[list[DecodeEvent]]:
    """Drives a loop-less engine step by step, every job submitted before the first step (so
    they are admitted together)."""
    handles = [engine.submit(j) for j in jobs]
    while engine.load() != (0, 0):
        if not engine._iteration():
            engine._wait_for_pulls()
    return [list(h.events(timeout=0)) for h in handles]


def tokens_of(events: list[DecodeEvent]) -> tuple[int, ...]:
    return tuple(t for e in events for t in e.token_ids)


def reads(core: EngineCore) -> float | None:
    return metric(core, "pantry_pool_client_read_seconds_count")


def test_a_repeat_on_the_same_engine_neither_pulls_nor_computes(
    core: EngineCore, tiny_llama: Path
) -> None:
    engine = DecodeEngine(core, background=False)
    ids = prompt(40, seed=41)
    [first] = run_to_end(engine, [job(ids, 4)])
    assert (first[0].pool_tokens, first[0].computed_tokens) == (0, 40)
    assert reads(core) == 1
    [again] = run_to_end(engine, [job(ids, 4, rid="again")])
    assert tokens_of(again) == tokens_of(first) == hf_greedy(tiny_llama, ids, 4)
    # Both full blocks were still held here: no pool read, only the 8-token tail computed.
    assert (again[0].pool_tokens, again[0].computed_tokens) == (32, 8)
    assert reads(core) == 1
    assert metric(core, "pantry_engine_local_hit_blocks_total") == 2
    engine.stop()


def test_an_exact_block_repeat_never_writes_the_shared_block(
    core: EngineCore, tiny_llama: Path
) -> None:
    engine = DecodeEngine(core, background=False)
    ids = prompt(32, seed=42)
    run_to_end(engine, [job(ids, 1)])
    keys = core.addressing.block_keys(ids, "")
    pool = core.runner.allocator
    held = pool.cached_prefix(keys)
    assert len(held) == 2
    before = [core.runner.kv.read_block(b) for b in held]
    [again] = run_to_end(engine, [job(ids, 5, rid="again")])
    assert tokens_of(again) == hf_greedy(tiny_llama, ids, 5)
    # The last token is recomputed (its logits), into a copy of its block: one token computed.
    assert (again[0].pool_tokens, again[0].computed_tokens) == (31, 1)
    assert reads(core) == 1
    assert pool.cached_prefix(keys) == held
    for block_id, data in zip(held, before, strict=True):
        assert torch.equal(core.runner.kv.read_block(block_id), data)
    engine.stop()


def test_blocks_completed_in_one_step_are_written_in_one_put(
    core: EngineCore, tiny_llama: Path
) -> None:
    engine = DecodeEngine(core, DecodeLimits(max_running=4), background=False)
    prompts = [prompt(10, seed=43), prompt(10, seed=44), prompt(10, seed=45)]
    results = run_to_end(engine, [job(p, 10, rid=f"s{i}") for i, p in enumerate(prompts)])
    for ids, events in zip(prompts, results, strict=True):
        assert tokens_of(events) == hf_greedy(tiny_llama, ids, 10)
    core.flush_writes()
    # KV for 19 tokens each: every sequence filled its first block in the same step.
    assert metric(core, "pantry_pool_client_write_seconds_count") == 1
    assert metric(core, "pantry_pool_client_blocks_stored_total") == 3
    assert core.pending_writes == 0
    with pool_client(core.config.kv_master) as c:
        for ids, events in zip(prompts, results, strict=True):
            full = (*ids, *tokens_of(events))
            assert c.exists(core.addressing.block_keys(full[:16], "")) == [True]
    # Once written, nothing is held for the writer: every block is free again.
    assert core.runner.allocator.num_free == core.runner.kv.num_blocks
    engine.stop()
