"""Short prompts computed by decode itself (`--decode-prefill-tokens`), through real processes:
the same tokens as transformers, no prefill call, the blocks stored in the pool for the next
request; a longer prompt still goes through prefill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import _system
from tests.e2e.local_system import LocalSystem
from tests.e2e.test_tiny_oracle import BLOCK, NEW_TOKENS, hf_greedy, prompt
from tests.kvstore.kv_helpers import wait_for

THRESHOLD = 2 * BLOCK + 8


@pytest.fixture(scope="module")
def short_system(tmp_path_factory: pytest.TempPathFactory,
                 tiny_dirs: dict[str, Path]) -> Iterator[LocalSystem]:
    yield from _system(tmp_path_factory, str(tiny_dirs["llama"]), "sys-short",
                       "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB",
                       "--decode-prefill-tokens", str(THRESHOLD))


def _routes(system: LocalSystem) -> dict[str, float]:
    got = system.metrics("conductor")
    return {route: got.get(f'pantry_conductor_requests_total{{finish="length",route="{route}"}}',
                           0.0)
            for route in ("decode_short", "decode_direct", "prefill_then_decode")}


def test_short_prompt_skips_prefill_then_hits_the_pool(short_system: LocalSystem,
                                                       tiny_dirs: dict[str, Path]) -> None:
    ids = prompt(THRESHOLD, seed=901)  # 2 full blocks and 8 tokens: at the threshold
    expected = hf_greedy(tiny_dirs["llama"], ids, NEW_TOKENS)
    routes, load = _routes(short_system), short_system.prefill_load()
    sealed = short_system.metrics("kv-master")["pantry_kv_master_puts_sealed_total"]
    miss = short_system.complete(ids, NEW_TOKENS)
    assert miss["choices"][0]["token_ids"] == expected
    assert miss["usage"]["prefill_skipped"] is True
    assert miss["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert short_system.prefill_load().requests_total == load.requests_total
    # Decode stores the prompt's full blocks on its background writer, in order, before the
    # one its output completes: once two are sealed, the repeat finds them in the pool.
    wait_for(lambda: short_system.metrics("kv-master")["pantry_kv_master_puts_sealed_total"]
             >= sealed + 2, timeout=30)
    hit = short_system.complete(ids, NEW_TOKENS)
    assert hit["choices"][0]["token_ids"] == expected
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
    after = _routes(short_system)
    assert after["decode_short"] == routes["decode_short"] + 1
    assert after["decode_direct"] == routes["decode_direct"] + 1


def test_longer_prompt_goes_through_prefill(short_system: LocalSystem,
                                            tiny_dirs: dict[str, Path]) -> None:
    ids = prompt(THRESHOLD + 1, seed=902)
    load = short_system.prefill_load()
    got = short_system.complete(ids, NEW_TOKENS)
    assert got["choices"][0]["token_ids"] == hf_greedy(tiny_dirs["llama"], ids, NEW_TOKENS)
    assert got["usage"]["prefill_skipped"] is False
    assert short_system.prefill_load().requests_total == load.requests_total + 1
