"""The batched paged attention equals the per-sequence reference on every kind of step: decode
only, one plain prefill, prefill after a cached prefix, and mixes of all of them. Every test
runs twice: through the CPU kernels (engine.cpu_paged_attention for decode,
engine.cpu_prefill_attention for prefill) and through torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import cpu_paged_attention, cpu_prefill_attention
from engine.attention import batched_paged_attention, reference_paged_attention
from engine.attention_batch import AttentionBatch

BLOCK = 4
HEADS, KV_HEADS, HD = 4, 2, 8
NUM_BLOCKS = 40


@pytest.fixture(autouse=True, params=["cpu-kernels", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setattr(cpu_paged_attention, "available", lambda: False)
        monkeypatch.setattr(cpu_prefill_attention, "supports", lambda *_: False)
    elif not (cpu_paged_attention.available() and cpu_prefill_attention.available()):
        pytest.skip(f"no CPU kernels: {cpu_paged_attention.unavailable_reason()}, "
                    f"{cpu_prefill_attention.unavailable_reason()}")
    return str(request.param)


def run(impl: object, q_lens: list[int], ctx_lens: list[int], seed: int = 0,
        window: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK, KV_HEADS, HD)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # Block tables deliberately out of order and interleaved between sequences.
    ids = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = []
    for q, ctx in zip(q_lens, ctx_lens, strict=True):
        n = -(-(q + ctx) // BLOCK) + 1
        tables.append(ids[:n])
        ids = ids[n:]
    t = sum(q_lens)
    q = torch.randn(t, HEADS, HD, generator=g)
    k, v = torch.randn(t, KV_HEADS, HD, generator=g), torch.randn(t, KV_HEADS, HD, generator=g)
    batch = AttentionBatch.build(q_lens, ctx_lens, tables, BLOCK, sliding_window=window)
    return impl(q, k, v, k_cache, v_cache, batch, HD**-0.5)  # type: ignore[operator]


@pytest.mark.parametrize(("q_lens", "ctx_lens"), [
    ([1, 1, 1], [0, 5, 17]),            # decode only, ragged contexts
    ([9], [0]),                          # one plain prefill (causal, nothing cached)
    ([6], [8]),                          # a chunk after a cached prefix
    ([5], [7]),                          # ... a prefix ending inside a block
    ([7, 3], [0, 4]),                    # two prefill chunks, padded to the longer
    ([1, 5, 1, 12, 1], [3, 0, 16, 2, 0]),  # decode and prefill in one step
    ([1, 6, 1], [3, 9, 5]),              # decode and a chunk after a cached prefix
])
def test_batched_equals_reference(q_lens: list[int], ctx_lens: list[int]) -> None:
    ours = run(batched_paged_attention, q_lens, ctx_lens)
    ref = run(reference_paged_attention, q_lens, ctx_lens)
    assert ours.shape == (sum(q_lens), HEADS, HD)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("q_lens", "ctx_lens"), [
    ([1, 1, 1], [0, 5, 17]),
    ([9], [0]),
    ([6], [8]),
    ([1, 5, 1, 12, 1], [3, 0, 16, 2, 0]),
])
def test_sliding_window_batched_equals_reference(q_lens: list[int], ctx_lens: list[int]) -> None:
    ours = run(batched_paged_attention, q_lens, ctx_lens, window=5)
    ref = run(reference_paged_attention, q_lens, ctx_lens, window=5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The window changes the answer wherever a sequence is longer than it.
    assert not torch.allclose(ours, run(batched_paged_attention, q_lens, ctx_lens))


def test_sliding_window_masks_exactly_the_last_positions() -> None:
    batch = AttentionBatch.build([1, 3], [6, 2], [[0, 1], [2, 3]], BLOCK, sliding_window=3)
    assert batch.decode is not None and batch.prefill is not None
    # Position 6 sees 4, 5, 6.
    assert batch.decode.key_mask.flatten().tolist() == [False] * 4 + [True] * 3 + [False]
    assert batch.prefill.mask[0, 0].int().tolist() == [   # positions 2, 3, 4
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
    ]


def test_step_metadata_is_grouped_once() -> None:
    batch = AttentionBatch.build([1, 5, 1], [3, 0, 6], [[7, 2], [0, 1], [5, 9]], BLOCK)
    assert batch.decode is not None and batch.prefill is not None
    assert batch.decode.rows.tolist() == [0, 6]
    # Row 0 (4 keys) needs one block, padded with its own first block; row 2 (7 keys) needs two.
    assert batch.decode.block_table.tolist() == [7, 7, 5, 9]
    assert batch.decode.key_mask.flatten(1).tolist() == [
        [True] * 4 + [False] * 4, [True] * 7 + [False]]
    assert batch.prefill.rows.tolist() == [1, 2, 3, 4, 5]
    assert batch.prefill.out_rows.tolist() == [1, 2, 3, 4, 5]
    assert batch.prefill.lone == (1, 0)  # one sequence, nothing cached: plain causal
    assert batch.prefill.sequences.tolist() == [[1, 5, 0]]
    assert batch.slot_mapping.tolist() == [31, 0, 1, 2, 3, 4, 38]


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_chunk_after_prefix_merges_to_one_softmax(heads: int, kv_heads: int) -> None:
    """A lone chunk after a cached prefix is two attention calls merged by log-sum-exp; with
    SmolLM2's grouping (3 query heads per KV head) and without grouping, it equals one softmax
    over prefix and chunk."""
    g = torch.Generator().manual_seed(1)
    q_len, ctx = 11, 21
    shape = (NUM_BLOCKS, BLOCK, kv_heads, HD)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    table = torch.randperm(NUM_BLOCKS, generator=g)[: -(-(q_len + ctx) // BLOCK)].tolist()
    q = torch.randn(q_len, heads, HD, generator=g) * 3  # sharper softmax: shares far from 1/2
    k, v = torch.randn(q_len, kv_heads, HD, generator=g), torch.randn(q_len, kv_heads, HD,
                                                                      generator=g)
    batch = AttentionBatch.build([q_len], [ctx], [table], BLOCK)
    assert batch.prefill is not None
    assert batch.prefill.lone == (0, ctx)
    ours = batched_paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch, HD**-0.5)
    ref = reference_paged_attention(q, k, v, k_cache, v_cache, batch, HD**-0.5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_only_a_lone_sequence_skips_the_mask() -> None:
    two = AttentionBatch.build([3, 5], [4, 0], [[0, 1], [2, 3]], BLOCK)
    assert two.prefill is not None and two.prefill.lone is None
    assert two.prefill.mask.shape == (2, 1, 5, 8)
    assert two.prefill.sequences.tolist() == [[0, 3, 4], [3, 5, 0]]
    after_decode = AttentionBatch.build([1, 5], [3, 6], [[0], [1, 2, 3]], BLOCK)
    assert after_decode.prefill is not None
    assert after_decode.prefill.lone == (1, 6)


def test_step_made_mask_and_slot_split_change_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The (block, offset) split made once a step is exactly what each layer would otherwise
    make, and the decode masks are made only when the torch path needs them, once: decode
    through them is bit-identical to decode without them."""
    q_lens, ctx_lens = [1, 1, 1, 4], [0, 5, 17, 3]
    batch = AttentionBatch.build(q_lens, ctx_lens, [[3, 9], [1, 4], [0, 7, 2, 8, 6], [5, 10]],
                                 BLOCK, sliding_window=6)
    dec = batch.decode
    assert dec is not None and batch.slot_index is not None
    assert "key_mask" not in vars(dec) and "key_bias" not in vars(dec)  # not made by build
    assert batch.prefill is not None and "mask" not in vars(batch.prefill)
    assert batch.slot_index[0].tolist() == [3, 4, 6, 5, 10, 10, 10]
    assert batch.slot_index[1].tolist() == [0, 1, 1, 3, 0, 1, 2]
    bare = dataclasses.replace(batch, slot_index=None)
    g = torch.Generator().manual_seed(3)
    shape = (NUM_BLOCKS, BLOCK, KV_HEADS, HD)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = sum(q_lens)
    q = torch.randn(t, HEADS, HD, generator=g)
    k, v = torch.randn(t, KV_HEADS, HD, generator=g), torch.randn(t, KV_HEADS, HD, generator=g)
    monkeypatch.setattr(cpu_paged_attention, "available", lambda: False)  # the torch path
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    ours = batched_paged_attention(q, k, v, *caches[0], batch, HD**-0.5)
    plain = batched_paged_attention(q, k, v, *caches[1], bare, HD**-0.5)
    assert torch.equal(ours, plain)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    bias = dec.key_bias.flatten(1)
    assert torch.equal(bias == 0, dec.key_mask.flatten(1))
    assert bias.dtype == torch.float32 and torch.equal(bias != 0, bias == float("-inf"))
    assert vars(dec)["key_bias"] is dec.key_bias  # made once, kept for every layer
    ref = reference_paged_attention(q, k, v, k_cache, v_cache, batch, HD**-0.5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
