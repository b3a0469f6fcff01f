"""The C prefill attention kernel against the per-sequence reference, on a real paged cache:
scattered blocks, ragged sequences beside decode rows, cached prefixes, grouped heads, a
sliding window; the same bits on one and two pool threads; the engine's torch path where it is
switched off or cannot take the shape."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import attention, cpu_pool
from engine import cpu_prefill_attention as kernel
from engine.attention import batched_paged_attention, reference_paged_attention
from engine.attention_batch import AttentionBatch
from engine.kv_cache import PagedKVCache
from tests.helpers.pool_threads import pool_size_restored

pytestmark = pytest.mark.skipif(not kernel.available(),
                                reason=f"no CPU kernel: {kernel.unavailable_reason()}")

BLOCK = 16
REPO = Path(__file__).resolve().parents[2]


def _step(heads: int, kv_heads: int, hd: int, q_lens: list[int], ctx_lens: list[int],
          window: int | None = None, seed: int = 0, sharpness: float = 1.0,
          ) -> tuple[AttentionBatch, PagedKVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    blocks = sum(-(-(q + c) // BLOCK) for q, c in zip(q_lens, ctx_lens, strict=True)) + 3
    kv = PagedKVCache(2, blocks, BLOCK, kv_heads, hd, torch.float32)
    kv.blocks.normal_()
    free = list(range(blocks))
    random.Random(seed).shuffle(free)  # blocks scattered over the cache, in no order
    tables = [[free.pop() for _ in range(-(-(q + c) // BLOCK))]
              for q, c in zip(q_lens, ctx_lens, strict=True)]
    batch = AttentionBatch.build(q_lens, ctx_lens, tables, BLOCK, sliding_window=window)
    t = sum(q_lens)
    # q as the model hands it over: a view of a wider row (q, k heads side by side).
    qk = torch.randn(t, heads + kv_heads, hd) * sharpness
    return batch, kv, qk[:, :heads], torch.randn(t, kv_heads, hd), torch.randn(t, kv_heads, hd)


def _kernel_out(batch: AttentionBatch, kv: PagedKVCache, q: torch.Tensor) -> torch.Tensor:
    assert batch.prefill is not None
    out = torch.full(q.shape, float("nan"))
    kernel.prefill_attention(q, kv.k[1], kv.v[1], batch.prefill.sequences,
                             batch.prefill.block_table, q.shape[-1] ** -0.5,
                             batch.sliding_window, out)
    return out


def _prefill_rows(batch: AttentionBatch) -> list[int]:
    cu = batch.cu_query_lens
    return [r for i, q in enumerate(batch.query_lens) if q > 1 for r in range(cu[i], cu[i + 1])]


# SmolLM2's shape, no grouping at head size 32, Llama's group of 4 at 128, a group of 6, and a
# head size (40) of no vector width.
@pytest.mark.parametrize(("heads", "kv_heads", "hd"),
                         [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 32), (4, 2, 40)])
@pytest.mark.parametrize(("q_lens", "ctx_lens", "window"), [
    ([300], [0], None),                         # plain causal: whole tiles and a partial one
    ([2], [0], None),                           # the smallest prefill
    ([50], [100], None),                        # after a prefix over several blocks, mid-block
    ([20, 1, 33, 1, 70], [0, 40, 5, 9, 16], None),  # ragged, beside decode rows
    ([40, 130, 1], [7, 0, 60], 24),             # a window shorter than the tiles
    ([90], [500], 200),                         # a window starting inside the cached prefix
])
def test_matches_the_reference(heads: int, kv_heads: int, hd: int, q_lens: list[int],
                               ctx_lens: list[int], window: int | None) -> None:
    batch, kv, q, k, v = _step(heads, kv_heads, hd, q_lens, ctx_lens, window, seed=heads + hd)
    # The reference writes the new K/V into the cache, then attends: the kernel reads it there.
    expected = reference_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, hd ** -0.5)
    got = _kernel_out(batch, kv, q)
    rows = _prefill_rows(batch)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)
    others = [r for r in range(sum(q_lens)) if r not in rows]
    assert got[others].isnan().all()  # decode rows are not the kernel's: left untouched


def test_sharp_softmax_as_exact_as_torch() -> None:
    """Scores tens apart (exps from 1 down to denormals and 0), against a float64 softmax: the
    kernel's error is torch's own float32 error (its vectorized exp is as exact as expf)."""
    batch, kv, q, k, v = _step(9, 3, 64, [200, 70], [0, 90], sharpness=6.0, seed=5)
    f32 = reference_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)  # writes K/V
    got = _kernel_out(batch, kv, q).double()
    exact = reference_paged_attention(q.double(), k.double(), v.double(), kv.k[1].double(),
                                      kv.v[1].double(), batch, 0.125)
    ours, torchs = (got - exact).abs(), (f32.double() - exact).abs()
    assert ours.max() < 1.2 * torchs.max() and ours.mean() < 1.1 * torchs.mean()
    assert torchs.max() > 1e-6  # sharp enough that float32 rounding shows


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 vector flags")
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx",)], ids=["avx2", "sse"])
def test_narrower_vectors_match_the_reference(flags: tuple[str, ...]) -> None:
    """Built for 8 lanes (AVX2, or the compiler's lowering where the machine has no AVX): the
    same results as the reference."""
    lib = kernel._build(flags)
    batch, kv, q, k, v = _step(9, 3, 64, [45, 1, 20], [30, 8, 0], seed=3)
    expected = reference_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)
    assert batch.prefill is not None
    got = torch.full(q.shape, float("nan"))
    seqs = torch.tensor([[0, 45, 30], [46, 20, 0]])
    kernel._attend(lib, q, kv.k[1], kv.v[1], seqs, batch.prefill.block_table, 0.125, None, got)
    rows = _prefill_rows(batch)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert got[45].isnan().all()


@pytest.fixture
def two_pool_threads() -> Iterator[None]:
    with pool_size_restored():
        yield


def test_same_bits_on_one_and_two_threads(two_pool_threads: None) -> None:
    """Each output row is one work item's, summed in a fixed order: who claims it changes no
    bit."""
    assert cpu_pool.available()
    batch, kv, q, k, v = _step(9, 3, 64, [700, 5, 1, 260], [0, 30, 12, 300], seed=2)
    reference_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)
    rows = _prefill_rows(batch)
    cpu_pool.set_threads(1)
    alone = _kernel_out(batch, kv, q)[rows]
    cpu_pool.set_threads(2)
    for _ in range(20):  # until the helper has taken items (the machine may keep it busy)
        helped = cpu_pool.helped_blocks()
        assert torch.equal(_kernel_out(batch, kv, q)[rows], alone)
        if cpu_pool.helped_blocks() > helped:
            break
    else:
        pytest.fail("the pool's helper never took an item")


@pytest.mark.parametrize(("q_lens", "ctx_lens", "window"), [
    ([64], [0], None),                 # lone, nothing cached
    ([48], [37], None),                # lone after a cached prefix (two calls merged)
    ([1, 30, 1, 17], [5, 20, 9, 0], None),  # several beside decode (the mask)
    ([30, 25], [10, 0], 12),           # a window (the mask)
])
def test_engine_takes_the_kernel_and_torch_when_switched_off(
        q_lens: list[int], ctx_lens: list[int], window: int | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `batched_paged_attention`: the kernel's rows where it is on, and the torch path,
    equal to the reference as well, where it does not apply."""
    batch, kv, q, k, v = _step(9, 3, 64, q_lens, ctx_lens, window, seed=7)
    expected = reference_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)
    ours = batched_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)
    rows = _prefill_rows(batch)
    assert torch.equal(ours[rows], _kernel_out(batch, kv, q)[rows])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernel, "supports", lambda *_: False)
    fallback = batched_paged_attention(q, k, v, kv.k[1], kv.v[1], batch, 0.125)
    torch.testing.assert_close(fallback, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fallback[rows], ours[rows])  # another summation: the torch path ran


def test_shapes_it_does_not_take() -> None:
    kv = PagedKVCache(1, 4, BLOCK, 2, 64, torch.float32)
    q = torch.randn(8, 4, 64)
    assert kernel.supports(q, kv.k[0], kv.v[0])
    odd = PagedKVCache(1, 4, BLOCK, 2, 12, torch.float32)
    assert not kernel.supports(torch.randn(8, 4, 12), odd.k[0], odd.v[0])  # head size 12
    assert not kernel.supports(q.double(), kv.k[0].double(), kv.v[0].double())
    assert not kernel.supports(q.bfloat16(), kv.k[0], kv.v[0])
    assert not kernel.supports(torch.randn(8, 64, 4).transpose(1, 2), kv.k[0], kv.v[0])
    assert not kernel.supports(torch.randn(8, 3, 64), kv.k[0], kv.v[0])  # 3 heads, 2 KV heads


def test_switch_turns_it_off_for_the_process() -> None:
    """PANTRY_CPU_PREFILL_ATTENTION=0: unavailable, the reason named, and the engine's prefill
    on the torch path."""
    code = ("from engine import cpu_prefill_attention as k; "
            "print(k.available(), k.unavailable_reason())")
    env = dict(os.environ, PANTRY_CPU_PREFILL_ATTENTION="0")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[0] == "False PANTRY_CPU_PREFILL_ATTENTION=0"


def test_cuda_never_reaches_it() -> None:
    assert attention.cpu_prefill_attention is kernel
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kv = PagedKVCache(1, 4, BLOCK, 2, 64, torch.float32, device="cuda")
    assert not kernel.supports(torch.randn(8, 4, 64, device="cuda"), kv.k[0], kv.v[0])
