"""The Triton kernels against their torch references on exact small shapes: block boundaries,
ragged block tables, GQA groups, sliding windows, all-zero rows.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
Triton chooses the interpreter when it is imported, so tests/conftest.py switches it on before
anything imports triton; with CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import triton_kernels as tk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def test_kernels_run_in_the_mode_this_machine_needs() -> None:
    # Off here means triton was imported before tests/conftest.py could switch the interpreter
    # on: every launch below would then fail on CPU tensors.
    assert tk.INTERPRETED is (not CUDA)


# ---- gather / scatter ---------------------------------------------------------------------------

# [L, num_blocks, block_size, n_kv, hd]: 3 x 8 x 16 x 2 x 40 = 1280 elements per layer-block, so a
# block spans two 1024-element chunks with a ragged last one.
CACHE_SHAPE = (3, 8, 16, 2, 40)


def _caches(seed: int, block_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [L, NB, B, n_kv, hd]: two contiguous tensors, or the views of one block-major
    tensor [NB, L, 2, B, n_kv, hd] the way engine.kv_cache keeps them (strided over blocks)."""
    if not block_major:
        return _randn(*CACHE_SHAPE, seed=seed), _randn(*CACHE_SHAPE, seed=seed + 100)
    num_layers, num_blocks, *inner = CACHE_SHAPE
    blocks = _randn(num_blocks, num_layers, 2, *inner, seed=seed)
    return blocks[:, :, 0].transpose(0, 1), blocks[:, :, 1].transpose(0, 1)


@pytest.mark.parametrize("block_major", [False, True])
@pytest.mark.parametrize("ids", [[5], [7, 0, 3], [2, 2, 6, 1]])
def test_gather_equals_reference(ids: list[int], block_major: bool) -> None:
    k, v = _caches(1, block_major)
    block_ids = torch.tensor(ids, device=DEVICE)
    got = tk.gather_blocks_triton(k, v, block_ids)
    want = tk.reference_gather_blocks(k, v, block_ids)
    assert got.shape == (len(ids), 3, 2, 16, 2, 40)
    assert torch.equal(got, want)
    # The pool layout itself: block i, layer l, K then V.
    assert torch.equal(got[-1, 2, 1], v[2, ids[-1]])
    assert torch.equal(got[0, 1, 0], k[1, ids[0]])


@pytest.mark.parametrize("block_major", [False, True])
def test_scatter_equals_reference_and_touches_only_its_blocks(block_major: bool) -> None:
    blocks = _randn(3, *CACHE_SHAPE[:1], 2, *CACHE_SHAPE[2:], seed=3)
    ids = torch.tensor([6, 1, 4], device=DEVICE)
    got_k, got_v = _caches(4, block_major)
    want_k, want_v = _caches(4, block_major)
    tk.scatter_blocks_triton(got_k, got_v, ids, blocks)
    tk.reference_scatter_blocks(want_k, want_v, ids, blocks)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    untouched = [0, 2, 3, 5, 7]
    assert torch.equal(got_k[:, untouched], _caches(4, block_major)[0][:, untouched])
    assert torch.equal(got_v[:, untouched], _caches(4, block_major)[1][:, untouched])
    assert torch.equal(tk.gather_blocks_triton(got_k, got_v, ids), blocks)


def test_scatter_converts_to_the_cache_dtype() -> None:
    k = torch.zeros(CACHE_SHAPE, dtype=torch.float16, device=DEVICE)
    v = torch.zeros_like(k)
    blocks = _randn(1, 3, 2, 16, 2, 40, seed=6)
    tk.scatter_blocks_triton(k, v, torch.tensor([3], device=DEVICE), blocks)
    assert torch.equal(k[:, 3], blocks[0, :, 0].half())


# ---- paged decode attention ---------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,n_kv,hd", [(6, 2, 8), (4, 4, 16), (5, 1, 12)])
@pytest.mark.parametrize("window", [None, 3, 4, 9])
def test_paged_decode_equals_reference(num_heads: int, n_kv: int, hd: int,
                                       window: int | None) -> None:
    """Ragged lengths: one key only, exactly one full block, one past a boundary, several blocks
    in a scattered table (padded with the row's own first block). The cache is one layer of a
    block-major cache (strided over blocks), as the engine's."""
    block_size, num_blocks = 4, 12
    blocks = _randn(num_blocks, 3, 2, block_size, n_kv, hd, seed=10)
    k_cache, v_cache = blocks[:, 1, 0], blocks[:, 1, 1]
    table = torch.tensor([[3, 3, 3, 3], [2, 2, 2, 2], [9, 0, 2, 2], [11, 7, 1, 5]], device=DEVICE)
    lens = torch.tensor([1, 4, 5, 15], device=DEVICE)
    q = _randn(4, num_heads, hd, seed=12)
    got = tk.paged_decode_attention_triton(q, k_cache, v_cache, table, lens, 0.25, window)
    want = tk.reference_paged_decode_attention(q, k_cache, v_cache, table, lens, 0.25, window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_paged_decode_reference_is_plain_attention() -> None:
    """The reference itself, against softmax(q k^T) v written out for one sequence and head."""
    k_cache, v_cache = _randn(6, 4, 1, 8, seed=20), _randn(6, 4, 1, 8, seed=21)
    q = _randn(1, 2, 8, seed=22)
    table = torch.tensor([[4, 1]], device=DEVICE)
    out = tk.reference_paged_decode_attention(q, k_cache, v_cache, table,
                                              torch.tensor([6], device=DEVICE), 0.5)
    keys = torch.cat((k_cache[4], k_cache[1]))[:6, 0]
    values = torch.cat((v_cache[4], v_cache[1]))[:6, 0]
    for h in range(2):
        want = torch.softmax(q[0, h] @ keys.T * 0.5, dim=-1) @ values
        torch.testing.assert_close(out[0, h], want, atol=1e-6, rtol=1e-6)


# ---- int8 quantize / dequantize -----------------------------------------------------------------


def test_quantize_equals_reference_exactly() -> None:
    # 2 x 3 x 17 rows of 40: a ragged last row-tile (102 rows, 16 per program) and a row of zeros.
    x = _randn(2, 3, 17, 40, seed=30) * 3
    x[1, 2, 5] = 0
    q, s = tk.quantize_int8_triton(x)
    q_ref, s_ref = tk.reference_quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (2, 3, 17)
    if tk.INTERPRETED:
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    else:
        # The GPU's float32 division may differ by an ulp: at most one step, on a tie.
        assert (q.int() - q_ref.int()).abs().max() <= 1
        torch.testing.assert_close(s, s_ref, atol=0, rtol=1e-6)
    assert torch.equal(s[1, 2, 5], torch.tensor(0.0, device=DEVICE))
    assert not q[1, 2, 5].any()
    assert q.abs().max() == 127


def test_dequantize_equals_reference_and_error_is_within_half_a_step() -> None:
    x = _randn(5, 7, 64, seed=31)
    x[0, 0] *= 100  # an outlier token: only its own row's scale grows
    q, s = tk.reference_quantize_int8(x)
    got = tk.dequantize_int8_triton(q, s, torch.float32)
    assert torch.equal(got, tk.reference_dequantize_int8(q, s, torch.float32))
    err = (got - x).abs()
    assert bool((err <= s[..., None] / 2 + 1e-6).all())
    assert s[0, 0] > 50 * s[0, 1]
    # Rounding steps of one exact case: amax 127 gives scale 1, values round half up.
    exact = torch.tensor([[127.0, -3.5, 2.5, 0.49, -127.0]], device=DEVICE)
    qe, se = tk.quantize_int8_triton(exact)
    assert qe.tolist() == [[127, -3, 3, 0, -127]]
    assert se.tolist() == [1.0]


def test_dequantize_to_half() -> None:
    q = torch.tensor([[1, -2, 127]], dtype=torch.int8, device=DEVICE)
    s = torch.tensor([0.5], device=DEVICE)
    out = tk.dequantize_int8_triton(q, s, torch.float16)
    assert out.dtype == torch.float16 and out.tolist() == [[0.5, -1.0, 63.5]]
