"""What a request streams: event order, exact usage, stop strings across chunks, and what
closing the stream early releases. Fake engines, a real pool, a one-character-per-token
tokenizer so text is predictable."""

from __future__ import annotations

from conductor.requests import GenerationFinished, PromptAccepted, TokensGenerated, Usage
from tests.conductor.fakes import (
    BLOCK,
    Rig,
    char_tokenizer,
    chunk,
    fake_decode,
    fake_prefill,
    prompt,
    request,
    timeless,
    token_ids,
)

SAY_OK = "please say ok and nothing more"  # 30 tokens: one full block, so prefill runs


def test_prefill_then_decode_event_order_and_usage(pool_address: str) -> None:
    pre = fake_prefill("p0", first_token=7, pool_tokens=BLOCK)
    decode = fake_decode("d0", chunk(7, 8, pool_tokens=2 * BLOCK, computed=8), chunk(9),
                         chunk(10, finish="length"))
    with Rig(pool_address, [pre], [decode]) as rig:
        rig.cache(prompt(40), blocks=1)
        events = rig.generate(request(prompt(40)))
        assert events[:-1] == [
            PromptAccepted(prompt(40)),
            TokensGenerated((7,), ""),   # prefill's first token, before decode is asked
            TokensGenerated((8,), ""),   # decode repeats 7 in its first chunk: dropped
            TokensGenerated((9,), ""),
            TokensGenerated((10,), ""),
        ]
        finished = events[-1]
        assert isinstance(finished, GenerationFinished)
        assert (finished.finish_reason, finished.text) == ("length", "")
        assert finished.usage.ttft_s > 0.0  # measured: only its sign is knowable
        assert timeless(finished.usage) == Usage(prompt_tokens=40, completion_tokens=4,
                                                 cached_tokens=BLOCK, ttft_s=0.0,
                                                 prefill_skipped=False)


def test_text_prompt_is_tokenized_and_output_detokenized(pool_address: str) -> None:
    pre = fake_prefill("p0", first_token=token_ids(" ")[0])
    decode = fake_decode("d0", chunk(*token_ids(" ok")), chunk(*token_ids("!"), finish="stop"))
    with Rig(pool_address, [pre], [decode], tokenizer=char_tokenizer()) as rig:
        events = rig.generate(request(text=SAY_OK))
        assert events[0] == PromptAccepted(token_ids(SAY_OK))
        assert pre.calls[0].token_ids == token_ids(SAY_OK)
        assert events[1:-1] == [TokensGenerated(token_ids(" "), " "),
                                TokensGenerated(token_ids("ok"), "ok"),
                                TokensGenerated(token_ids("!"), "!")]
        assert isinstance(events[-1], GenerationFinished)
        assert events[-1].finish_reason == "stop"


def test_stop_string_is_held_back_across_chunks_and_finishes_with_stop(
    pool_address: str,
) -> None:
    """'ab#' then '#cd': the '#' that may start '##' waits for the next chunk, which
    completes the stop string. Nothing of it or after it is sent; the decode stream closes."""
    decode = fake_decode("d0", chunk(*token_ids("ab#")), chunk(*token_ids("#cd")),
                         chunk(*token_ids("ef"), finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [decode], tokenizer=char_tokenizer()) as rig:
        rig.cache(prompt(32))
        events = rig.generate(request(prompt(32), max_tokens=8, stop=("##",)))
        assert events[1:-1] == [TokensGenerated(token_ids("ab#"), "ab"),
                                TokensGenerated(token_ids("#cd"), "")]
        finished = events[-1]
        assert isinstance(finished, GenerationFinished)
        assert (finished.finish_reason, finished.text) == ("stop", "")
        assert finished.usage.completion_tokens == 6
        assert (decode.open_streams, decode.closed_streams) == (0, 1)
        assert rig.sample("pantry_conductor_requests_total",
                          route="decode_direct", finish="stop") == 1


def test_held_back_text_is_released_when_no_stop_string_comes(pool_address: str) -> None:
    decode = fake_decode("d0", chunk(*token_ids("ab#")), chunk(*token_ids("c#"), finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [decode], tokenizer=char_tokenizer()) as rig:
        rig.cache(prompt(32))
        events = rig.generate(request(prompt(32), max_tokens=5, stop=("##",)))
        assert events[1:-1] == [TokensGenerated(token_ids("ab#"), "ab"),
                                TokensGenerated(token_ids("c#"), "#c")]
        finished = events[-1]
        assert isinstance(finished, GenerationFinished)
        assert (finished.finish_reason, finished.text) == ("length", "#")


def test_stop_string_in_the_prefilled_first_token_skips_decode(pool_address: str) -> None:
    pre = fake_prefill("p0", first_token=token_ids(".")[0])
    decode = fake_decode("d0", chunk(7, finish="length"))
    with Rig(pool_address, [pre], [decode], tokenizer=char_tokenizer()) as rig:
        events = rig.generate(request(prompt(40), stop=(".",)))
        assert events[1:-1] == [TokensGenerated(token_ids("."), "")]
        finished = events[-1]
        assert isinstance(finished, GenerationFinished)
        assert (finished.finish_reason, finished.usage.completion_tokens) == ("stop", 1)
        assert decode.calls == []
        assert rig.decode_states[0].inflight_requests == 0


def test_closing_the_stream_mid_way_releases_everything(pool_address: str) -> None:
    decode = fake_decode("d0", chunk(7, 8), chunk(9), chunk(10, finish="length"))
    with Rig(pool_address, [fake_prefill("p0", first_token=7)], [decode]) as rig:
        conductor = rig.conductor

        async def read_two_tokens_then_leave() -> None:
            events = conductor.generate(request(prompt(40)))
            assert await anext(events) == PromptAccepted(prompt(40))
            assert await anext(events) == TokensGenerated((7,), "")
            assert await anext(events) == TokensGenerated((8,), "")
            assert decode.open_streams == 1
            assert rig.decode_states[0].inflight_requests == 1
            assert rig.sample("pantry_conductor_inflight_requests") == 1
            await events.aclose()
            # at once, not when the generators are garbage-collected
            assert (decode.open_streams, decode.closed_streams) == (0, 1)

        rig.run(read_two_tokens_then_leave())
        assert rig.decode_states[0].inflight_requests == 0
        assert rig.prefill_states[0].inflight_tokens == 0
        assert rig.sample("pantry_conductor_inflight_requests") == 0
        assert rig.sample("pantry_conductor_requests_total",
                          route="prefill_then_decode", finish="cancelled") == 1
        assert rig.sample("pantry_conductor_generated_tokens_total") == 2
