"""Where the conductor sends a request: prefill by predicted TTFT, a full pool hit straight to
decode, decode by free blocks and load. Fake engines, a real pool."""

from __future__ import annotations

import pytest

from conductor.perf_model import PrefillModel, TransferModel
from conductor.requests import GenerationFinished, PromptAccepted, TokensGenerated, Usage
from pantry.common.sampling import SamplingParams
from tests.conductor.fakes import (
    BLOCK,
    DecodeCall,
    PrefillCall,
    Rig,
    chunk,
    engine_load,
    fake_decode,
    fake_prefill,
    prompt,
    request,
    timeless,
)

GREEDY_4 = SamplingParams(temperature=0.0, max_tokens=4)


def test_prefill_goes_to_the_engine_with_the_lowest_predicted_ttft(pool_address: str) -> None:
    busy, idle = fake_prefill("busy"), fake_prefill("idle")
    decode = fake_decode("d0", chunk(7, 8), chunk(9, 10, finish="length"))
    with Rig(pool_address, [busy, idle], [decode]) as rig:
        rig.prefill_states[0].inflight_tokens = 100  # another request's prompt is queued there
        rig.prefill_states[0].ledger.busy_until = 1e12
        req = request(prompt(40))
        events = rig.generate(req)
        assert busy.calls == []
        assert idle.calls == [PrefillCall(req.request_id, prompt(40), "", GREEDY_4)]
        assert decode.calls == [DecodeCall(req.request_id, prompt(40), "", GREEDY_4, 7)]
        assert [e.token_ids for e in events if isinstance(e, TokensGenerated)] == [
            (7,), (8,), (9, 10)]
        # Nothing this conductor sent is still counted against the engines.
        assert [(s.inflight_tokens, s.inflight_requests) for s in rig.prefill_states] == [
            (100, 0), (0, 0)]
        assert rig.decode_states[0].inflight_requests == 0


def test_prefill_prefers_the_engine_measured_faster(pool_address: str) -> None:
    slow, fast = fake_prefill("slow"), fake_prefill("fast")
    with Rig(pool_address, [slow, fast], [fake_decode("d0", chunk(7, finish="length"))]) as rig:
        rig.prefill_states[0].prefill_model = PrefillModel(per_token_s=4e-3)
        rig.prefill_states[1].prefill_model = PrefillModel(per_token_s=1e-3)
        rig.generate(request(prompt(20), max_tokens=1))
        assert (len(slow.calls), len(fast.calls)) == (0, 1)


def test_prefill_engine_that_is_down_is_not_chosen(pool_address: str) -> None:
    down, up = fake_prefill("down"), fake_prefill("up")
    with Rig(pool_address, [down, up], [fake_decode("d0", chunk(7, finish="length"))]) as rig:
        rig.prefill_states[0].up = False
        rig.generate(request(prompt(20), max_tokens=1))
        assert (len(down.calls), len(up.calls)) == (0, 1)


def test_partial_pool_hit_is_prefilled_and_the_cached_part_predicted_cheap(
    pool_address: str,
) -> None:
    """With one of two full blocks in the pool, a 0.05 s SLO admits a 40-token prompt that it
    would refuse cold: 24 tokens to compute and one block to pull."""
    pre = fake_prefill("p0", first_token=7, pool_tokens=BLOCK)
    decode = fake_decode("d0", chunk(7, 8, pool_tokens=2 * BLOCK), chunk(9, 10, finish="length"))
    with Rig(pool_address, [pre], [decode], ttft_slo_s=0.05) as rig:
        rig.cache(prompt(40), blocks=1)
        assert PrefillModel().predict(24, 16) + TransferModel().seconds("pool") == (
            pytest.approx(24 * 2e-3 + 2e-4))
        events = rig.generate(request(prompt(40)))
        assert len(pre.calls) == 1
        finished = events[-1]
        assert isinstance(finished, GenerationFinished)
        # cached_tokens is what prefill pulled, not what decode later pulled of prefill's work
        assert timeless(finished.usage) == Usage(prompt_tokens=40, completion_tokens=4,
                                                 cached_tokens=BLOCK, ttft_s=0.0,
                                                 prefill_skipped=False)


def test_full_pool_hit_skips_prefill_and_decode_computes_the_tail(pool_address: str) -> None:
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(11, pool_tokens=2 * BLOCK, computed=8),
                         chunk(12), chunk(13, 14, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        rig.cache(prompt(40))  # both full blocks; the last 8 tokens fill no block
        req = request(prompt(40))
        events = rig.generate(req)
        assert pre.calls == []
        assert decode.calls == [DecodeCall(req.request_id, prompt(40), "", GREEDY_4, None)]
        assert events[0] == PromptAccepted(prompt(40))
        assert events[1:4] == [TokensGenerated((11,), ""), TokensGenerated((12,), ""),
                               TokensGenerated((13, 14), "")]
        finished = events[4]
        assert isinstance(finished, GenerationFinished)
        assert finished.finish_reason == "length"
        assert timeless(finished.usage) == Usage(prompt_tokens=40, completion_tokens=4,
                                                 cached_tokens=2 * BLOCK, ttft_s=0.0,
                                                 prefill_skipped=True)


def test_pool_keys_are_per_tenant(pool_address: str) -> None:
    pre = fake_prefill("p0")
    with Rig(pool_address, [pre], [fake_decode("d0", chunk(7, finish="length"))]) as rig:
        rig.cache(prompt(32), tenant="acme")
        rig.generate(request(prompt(32), tenant="acme", max_tokens=1))
        assert pre.calls == []
        rig.generate(request(prompt(32), tenant="other", max_tokens=1))
        assert [c.tenant for c in pre.calls] == ["other"]


def test_decode_goes_where_the_sequence_fits(pool_address: str) -> None:
    """40 prompt + 4 new tokens need 3 blocks of 16: 'small' has 2 free, 'roomy' 10."""
    small = fake_decode("small", chunk(7, finish="length"))
    roomy = fake_decode("roomy", chunk(7, finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [small, roomy]) as rig:
        rig.decode_states[0].load = engine_load(free_blocks=2)
        rig.decode_states[1].load = engine_load(free_blocks=10, waiting=5)
        rig.generate(request(prompt(40)))
        assert (len(small.calls), len(roomy.calls)) == (0, 1)


def test_decode_goes_to_the_least_busy_engine_that_fits(pool_address: str) -> None:
    busy = fake_decode("busy", chunk(7, finish="length"))
    calm = fake_decode("calm", chunk(7, finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [busy, calm]) as rig:
        rig.decode_states[0].load = engine_load(free_blocks=50, waiting=3)
        rig.decode_states[1].load = engine_load(free_blocks=10, waiting=1)
        rig.generate(request(prompt(40)))
        assert (len(busy.calls), len(calm.calls)) == (0, 1)
        rig.decode_states[1].inflight_requests = 5  # now this conductor keeps 'calm' busier
        rig.generate(request(prompt(40)))
        assert (len(busy.calls), len(calm.calls)) == (1, 1)


def test_pool_down_is_a_miss_not_an_error(pool_address: str) -> None:
    pre = fake_prefill("p0")
    with Rig(pool_address, [pre], [fake_decode("d0", chunk(7, finish="length"))]) as rig:
        rig.cache(prompt(32))
        rig.pool.close()
        events = rig.generate(request(prompt(32), max_tokens=1))
        assert len(pre.calls) == 1
        assert isinstance(events[-1], GenerationFinished)
        assert events[-1].usage.prefill_skipped is False


def test_prompt_shorter_than_a_block_goes_straight_to_decode(pool_address: str) -> None:
    """No full block means nothing prefill could store: decode computes it all."""
    pre = fake_prefill("p0")
    decode = fake_decode("d0", chunk(7, computed=BLOCK - 1, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        events = rig.generate(request(prompt(BLOCK - 1), max_tokens=1))
        assert pre.calls == []
        assert isinstance(events[-1], GenerationFinished)
        assert timeless(events[-1].usage) == Usage(prompt_tokens=BLOCK - 1, completion_tokens=1,
                                                   cached_tokens=0, ttft_s=0.0,
                                                   prefill_skipped=True)
        assert rig.sample("pantry_conductor_requests_total",
                          route="decode_direct", finish="length") == 1
