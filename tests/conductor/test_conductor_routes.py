"""Which prompts skip the prefill engine: a full pool hit always, and with
`decode_prefill_tokens` set, any prompt with at most that many tokens left to compute."""

from __future__ import annotations

import pytest

from conductor.requests import GenerationFinished
from tests.conductor.fakes import BLOCK, Rig, chunk, fake_decode, fake_prefill, prompt, request


def _served(rig: Rig, tokens: tuple[int, ...]) -> tuple[int, list[int | None], bool]:
    """(prefill calls, decode calls' first tokens, prefill_skipped) of one request."""
    pre, dec = rig.prefills[0], rig.decodes[0]
    pre.calls.clear()
    dec.calls.clear()
    events = rig.generate(request(tokens, max_tokens=1))
    finished = events[-1]
    assert isinstance(finished, GenerationFinished)
    return len(pre.calls), [c.first_token for c in dec.calls], finished.usage.prefill_skipped


@pytest.mark.parametrize(("threshold", "cached_blocks", "length", "prefilled"), [
    (0, 0, 40, True),                    # off: every miss goes through prefill
    (40, 0, 40, False),                  # exactly the threshold: decode computes it
    (39, 0, 40, True),                   # one token over
    (24, 2, 3 * BLOCK + 8, False),       # 24 left after the pool's 2 blocks
    (23, 2, 3 * BLOCK + 8, True),
    (0, 3, 3 * BLOCK, False),            # a full hit skips prefill whatever the setting
])
def test_route_by_tokens_left_to_compute(pool_address: str, threshold: int, cached_blocks: int,
                                         length: int, prefilled: bool) -> None:
    pre = fake_prefill("p0", first_token=5)
    dec = fake_decode("d0", chunk(5, finish="length"))
    with Rig(pool_address, [pre], [dec], decode_prefill_tokens=threshold) as rig:
        # A start of its own: the pool outlives each test, and other tests cache prompt(n).
        tokens = prompt(length, start=7000 + 100 * threshold + cached_blocks)
        if cached_blocks:
            rig.cache(tokens, blocks=cached_blocks)
        calls, first_tokens, skipped = _served(rig, tokens)
        assert calls == (1 if prefilled else 0)
        assert first_tokens == [5 if prefilled else None]
        assert skipped is not prefilled
        route = ("prefill_then_decode" if prefilled
                 else "decode_direct" if cached_blocks * BLOCK == length else "decode_short")
        assert rig.sample("pantry_conductor_requests_total", route=route,
                          finish="length") == 1


def test_negative_threshold_is_refused(pool_address: str) -> None:
    from pantry.common.errors import ConfigError

    with pytest.raises(ConfigError, match="decode_prefill_tokens"):
        Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")], decode_prefill_tokens=-1)
