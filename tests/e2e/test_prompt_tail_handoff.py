"""The prompt's partial last block through real processes (`pantry local`): prefill stores it
under its tail key, decode pulls it and computes none of the prompt; the tokens are
transformers'. A prompt of whole blocks has no tail: decode computes none of it either."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.local_system import LocalSystem
from tests.e2e.test_tiny_oracle import BLOCK, NEW_TOKENS, hf_greedy, prompt


def _engine_series(system: LocalSystem, role: str, name: str) -> float:
    """One engine role's series (its only engine), 0 before it is first counted."""
    got = [v for k, v in system.metrics(role).items() if k.startswith(name + "{")]
    assert len(got) <= 1, got
    return got[0] if got else 0.0


def _counts(system: LocalSystem) -> tuple[float, float, float]:
    """(tails stored by prefill, tails pulled by decode, prompt tokens decode computed)."""
    return (_engine_series(system, "prefill", "pantry_engine_prompt_tails_stored_total"),
            _engine_series(system, "decode", "pantry_engine_prompt_tails_pulled_total"),
            _engine_series(system, "decode", "pantry_engine_computed_tokens_total"))


def test_handoff_pulls_the_tail_and_matches_transformers(llama_system: LocalSystem,
                                                         tiny_dirs: dict[str, Path]) -> None:
    for length, tail in ((3 * BLOCK + 9, 1), (3 * BLOCK, 0)):
        ids = prompt(length, seed=950 + length)
        expected = hf_greedy(tiny_dirs["llama"], ids, NEW_TOKENS)
        stored, pulled, computed = _counts(llama_system)
        got = llama_system.complete(ids, NEW_TOKENS)
        assert got["choices"][0]["token_ids"] == expected
        assert got["usage"]["prefill_skipped"] is False
        # Counted before the first token leaves each engine, so already in these scrapes.
        assert _counts(llama_system) == (stored + tail, pulled + tail, computed)
