"""The prompt's partial last block across the prefill -> decode handoff, over a real kvstore and
real engines: prefill stores it under its tail key with the prompt's last full blocks; decode
pulls it into the block after them and computes none of the prompt, only the first token's own
step (a prompt of whole blocks likewise). A damaged or missing tail is a miss: decode computes
it, with the same output."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from decode.config import DecodeLimits
from decode.engine import DecodeEngine
from decode.sequence import DecodeEvent, DecodeJob
from engine.block_keys import KeyChain
from engine.role_core import EngineCore
from kvstore.block_object import header_size
from pantry.common.sampling import SamplingParams
from prefill.engine import PrefillEngine, PrefillJob
from tests.decode.engine_rig import BLOCK, hf_greedy, make_core, metric, pool_client, prompt
from tests.kvstore.kv_helpers import wait_for

WAIT_S = 0.1  # handoff_wait_s: how long decode waits for a block that never comes


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@dataclass
class Rig:
    prefill: PrefillEngine
    decode: DecodeEngine

    @property
    def pcore(self) -> EngineCore:
        return self.prefill.core

    @property
    def dcore(self) -> EngineCore:
        return self.decode.core

    def prefilled(self, ids: tuple[int, ...], sampling: SamplingParams) -> int:
        """The first token, once every block prefill stores for it is in the pool."""
        first = self.prefill.prefill(PrefillJob("r", ids, "", sampling)).first_token
        self.pcore.flush_writes()
        return first

    def decoded(self, ids: tuple[int, ...], sampling: SamplingParams,
                first_token: int | None) -> list[DecodeEvent]:
        job = DecodeJob("r", ids, "", sampling, first_token=first_token)
        events = list(self.decode.submit(job).events(timeout=30))
        alloc = self.dcore.runner.allocator
        wait_for(lambda: self.decode.load() == (0, 0) and alloc.num_free == alloc.num_blocks,
                 timeout=10, what="decode idle with every block free")
        self.dcore.flush_writes()
        return events

    def keys(self, tokens: tuple[int, ...]) -> tuple[list[str], str | None]:
        chain = KeyChain(self.dcore.addressing.hasher(""), tokens)
        return chain.keys, chain.tail_key(tokens)


@pytest.fixture
def rig(tiny_llama: Path, pool_address: str) -> Iterator[Rig]:
    pcore = make_core(tiny_llama, pool_address, "prefill", "prefill-t")
    dcore = make_core(tiny_llama, pool_address, "decode", "decode-t")
    prefill = PrefillEngine(pcore)
    decode = DecodeEngine(dcore, DecodeLimits(handoff_wait_s=WAIT_S))
    yield Rig(prefill, decode)
    for engine in (prefill, decode):
        engine.stop()
        engine.core.close()


def tokens_of(events: list[DecodeEvent]) -> tuple[int, ...]:
    return tuple(t for e in events for t in e.token_ids)


def counts(core: EngineCore) -> list[float | None]:
    """Decode's pool blocks hit, missed, rejected, stored; its tails pulled; prefill's stored."""
    pool = "pantry_pool_client_blocks_"
    return [*(metric(core, f"{pool}{kind}_total") for kind in
              ("hit", "missed", "rejected", "stored")),
            metric(core, "pantry_engine_prompt_tails_pulled_total"),
            metric(core, "pantry_engine_prompt_tails_stored_total")]


@pytest.mark.parametrize(("length", "seed"), [(33, 101), (47, 102), (48, 103)])
def test_handoff_output_equals_transformers_and_the_tail_is_pulled(
        rig: Rig, tiny_llama: Path, length: int, seed: int) -> None:
    ids = prompt(length, seed=seed)
    expected = hf_greedy(tiny_llama, ids, 8)
    first = rig.prefilled(ids, greedy(8))
    assert first == expected[0]
    tail = length % BLOCK  # 1, 15, 0
    assert counts(rig.pcore)[3:] == [length // BLOCK + (tail > 0), 0, int(tail > 0)]

    events = rig.decoded(ids, greedy(8), first)
    assert tokens_of(events) == expected
    output = tokens_of(events)
    # KV for the prompt and 7 output tokens: the blocks those fill beyond the prompt's own full
    # ones are decode's to store, under their full keys (for 47 tokens, the tail's block).
    stored = (length + 7) // BLOCK - length // BLOCK
    # All of the prompt came from the pool (its tail too, when it has one): decode computed none
    # of it, not even the last token, whose logits the given first token makes unneeded. Its
    # first step is the first token's own.
    assert (events[0].pool_tokens, events[0].computed_tokens) == (length, 0)
    assert counts(rig.dcore) == [3, 0, 0, stored, int(tail > 0), 0]
    assert metric(rig.dcore, "pantry_engine_computed_tokens_total") == 0
    assert metric(rig.dcore, "pantry_engine_time_between_tokens_seconds_count") == 7

    # The same handoff again (a retry, say): the full blocks are held by this engine now, so
    # only the tail is pulled; still nothing of the prompt computed.
    again = rig.decoded(ids, greedy(8), first)
    assert tokens_of(again) == expected
    assert (again[0].pool_tokens, again[0].computed_tokens) == (length, 0)
    assert metric(rig.dcore, "pantry_engine_local_hit_blocks_total") == length // BLOCK
    assert counts(rig.dcore) == [3 + (tail > 0), 0, 0, 2 * stored, 2 * (tail > 0), 0]
    assert metric(rig.dcore, "pantry_engine_computed_tokens_total") == 0

    full, tail_key = rig.keys(ids)
    grown, _ = rig.keys((*ids, *output[:7]))
    assert grown[: len(full)] == full and len(grown) == len(full) + stored
    alloc = rig.dcore.runner.allocator
    # The engine-local prefix cache holds full blocks only, the tail's block under its full key
    # once the output filled it; never under the tail key.
    assert len(alloc.cached_prefix(grown)) == len(grown)
    with pool_client(rig.dcore.config.kv_master) as c:
        assert c.exists(grown) == [True] * len(grown)
        if tail_key is not None:
            assert alloc.cached_prefix([tail_key]) == []
            assert tail_key not in grown
            assert c.exists([tail_key]) == [True]


def _flip_tail_payload_byte(rig: Rig, tail_key: str) -> None:
    with pool_client(rig.dcore.config.kv_master) as c:
        match = c.match_prefix([tail_key])
        assert match.matched == 1
        node = match.nodes[match.node_index[0]]
        at = match.offsets[0] + header_size(tail_key, rig.dcore.transfer.layout) + 100
    with open(node.segment_path, "r+b") as segment:
        segment.seek(at)
        byte = segment.read(1)[0]
        segment.seek(at)
        segment.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", ["corrupted", "removed"])
def test_a_bad_or_missing_tail_is_computed(rig: Rig, tiny_llama: Path, damage: str) -> None:
    ids = prompt(47, seed=104)
    expected = hf_greedy(tiny_llama, ids, 6)
    first = rig.prefilled(ids, greedy(6))
    _, tail_key = rig.keys(ids)
    assert tail_key is not None
    if damage == "corrupted":
        _flip_tail_payload_byte(rig, tail_key)
    else:
        with pool_client(rig.dcore.config.kv_master) as c:
            assert c.remove([tail_key]) == 1
    events = rig.decoded(ids, greedy(6), first)
    assert tokens_of(events) == expected
    # The two full blocks pulled; the 15-token tail computed; the block it is in stored under
    # its full key once the output filled it.
    assert (events[0].pool_tokens, events[0].computed_tokens) == (32, 15)
    if damage == "corrupted":
        # Refused at the first look and at the one check for sealed blocks that follows:
        # a sealed object that fails its checks ends the wait.
        assert counts(rig.dcore) == [2, 0, 2, 1, 0, 0]
    else:
        # Never sealed: decode waits WAIT_S for it, then computes.
        assert counts(rig.dcore) == [2, 1, 0, 1, 0, 0]
        waited = metric(rig.dcore, "pantry_engine_handoff_wait_seconds_total")
        assert waited is not None and WAIT_S <= waited < 10 * WAIT_S


def test_seeded_sampling_is_the_same_with_the_tail_pulled(rig: Rig) -> None:
    """A handoff that pulls its tail samples no first token itself; it still takes that draw
    from the request's generator, so the tokens after the first are those of a request that
    decode computes alone (fallback), which samples its own first token."""
    ids = prompt(37, seed=105)
    sampling = SamplingParams(temperature=1.5, top_k=100, max_tokens=12, seed=9,
                              ignore_eos=True)
    first = rig.prefilled(ids, sampling)
    handoff = tokens_of(rig.decoded(ids, sampling, first))
    assert metric(rig.dcore, "pantry_engine_prompt_tails_pulled_total") == 1
    alone = tokens_of(rig.decoded(ids, sampling, None))
    assert handoff == alone
    assert len(set(alone)) > 3  # really sampled, not a fixed point


def test_a_handoff_done_at_its_first_token_is_released_at_once(rig: Rig, tiny_llama: Path) -> None:
    ids = prompt(21, seed=106)
    first = rig.prefilled(ids, greedy(1))
    events = rig.decoded(ids, greedy(1), first)
    assert events == [DecodeEvent((hf_greedy(tiny_llama, ids, 1)[0],), "length",
                                  pool_tokens=21, computed_tokens=0)]
    assert metric(rig.dcore, "pantry_engine_requests_total") == 1
    assert metric(rig.dcore, "pantry_engine_time_between_tokens_seconds_count") == 0
    assert metric(rig.dcore, "pantry_engine_prompt_tails_pulled_total") == 1
