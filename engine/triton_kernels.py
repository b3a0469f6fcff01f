"""Triton kernels for the engine's CUDA path, each beside the torch reference it must equal.

Three kernel families:
  * block gather/scatter between the paged cache ([L, num_blocks, B, n_kv, hd] for K and for V)
    and the pool's block layout ([n, L, 2, B, n_kv, hd]: layer-major, K then V);
  * paged decode attention: one query token per sequence over its block table;
  * KV int8 quantize/dequantize, one float32 scale per token per KV head (see `quantize_int8`).

The public functions (`gather_blocks`, `scatter_blocks`, `paged_decode_attention`,
`quantize_int8`, `dequantize_int8`) are the dispatch point: Triton when the tensors are on CUDA,
the torch reference otherwise, so CPU engines run exactly the references. The `*_triton`
launchers also run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which must be
set before this module is imported: `triton.jit` reads it when the kernels are defined), which is
how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Whether the kernels below were defined for Triton's interpreter (CPU tensors) or compiled.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

INT8_MAX = 127.0
# Guards the division of an all-zero row (whose scale is 0 either way); the same in both paths.
_TINY = 1e-30
# A window longer than any context: "no sliding window" without a branch in the kernel.
_NO_WINDOW = 1 << 30
_COPY_CHUNK = 1024


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda


# ---- block gather / scatter ---------------------------------------------------------------------


def reference_gather_blocks(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor) -> Tensor:
    """[n, L, 2, B, n_kv, hd]: each listed block's K and V for every layer, in pool layout."""
    k = k_cache.index_select(1, block_ids)  # [L, n, B, n_kv, hd]
    v = v_cache.index_select(1, block_ids)
    return torch.stack((k, v), dim=2).transpose(0, 1).contiguous()


def reference_scatter_blocks(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor,
                             blocks: Tensor) -> None:
    """The inverse of `reference_gather_blocks`: blocks [n, L, 2, B, n_kv, hd] into the cache."""
    blocks = blocks.to(k_cache.dtype)
    k_cache.index_copy_(1, block_ids, blocks[:, :, 0].transpose(0, 1))
    v_cache.index_copy_(1, block_ids, blocks[:, :, 1].transpose(0, 1))


@triton.jit
def _gather_blocks_kernel(k_ptr, v_ptr, out_ptr, ids_ptr, layer_stride, block_stride, block_elems,
                          num_layers, CHUNK: tl.constexpr):
    i = tl.program_id(0)            # the i-th listed block
    lkv = tl.program_id(1)          # layer * 2 + (0: K, 1: V)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    src = (lkv // 2).to(tl.int64) * layer_stride + block_id * block_stride + offs
    dst = (i.to(tl.int64) * num_layers * 2 + lkv) * block_elems + offs
    if lkv % 2 == 0:
        x = tl.load(k_ptr + src, mask=mask)
    else:
        x = tl.load(v_ptr + src, mask=mask)
    tl.store(out_ptr + dst, x, mask=mask)


@triton.jit
def _scatter_blocks_kernel(k_ptr, v_ptr, src_ptr, ids_ptr, layer_stride, block_stride,
                           block_elems, num_layers, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    lkv = tl.program_id(1)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    dst = (lkv // 2).to(tl.int64) * layer_stride + block_id * block_stride + offs
    x = tl.load(src_ptr + (i.to(tl.int64) * num_layers * 2 + lkv) * block_elems + offs, mask=mask)
    if lkv % 2 == 0:
        tl.store(k_ptr + dst, x.to(k_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(v_ptr + dst, x.to(v_ptr.dtype.element_ty), mask=mask)


def _copy_grid(k_cache: Tensor, v_cache: Tensor, n: int
               ) -> tuple[tuple[int, int, int], int, int, int]:
    """(grid, layer stride, block stride, elements of one layer's K of one block) for a block
    copy. The caches [L, NB, B, n_kv, hd] may be strided over layers and blocks (the engine's
    block-major cache is); one layer's K of one block must be contiguous."""
    assert k_cache.dim() == 5 and k_cache.stride() == v_cache.stride()
    assert k_cache[0, 0].is_contiguous(), "one layer's K of one block must be contiguous"
    block_elems = k_cache[0, 0].numel()
    grid = (n, 2 * k_cache.shape[0], triton.cdiv(block_elems, _COPY_CHUNK))
    return grid, k_cache.stride(0), k_cache.stride(1), block_elems


def gather_blocks_triton(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor) -> Tensor:
    assert v_cache.shape == k_cache.shape
    n = block_ids.numel()
    num_layers = k_cache.shape[0]
    out = torch.empty((n, num_layers, 2, *k_cache.shape[2:]), dtype=k_cache.dtype,
                      device=k_cache.device)
    if n == 0:
        return out
    grid, layer_stride, block_stride, block_elems = _copy_grid(k_cache, v_cache, n)
    _gather_blocks_kernel[grid](
        k_cache, v_cache, out, block_ids.to(torch.int64).contiguous(), layer_stride,
        block_stride, block_elems, num_layers, CHUNK=_COPY_CHUNK)
    return out


def scatter_blocks_triton(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor,
                          blocks: Tensor) -> None:
    assert v_cache.shape == k_cache.shape
    n = block_ids.numel()
    num_layers = k_cache.shape[0]
    assert tuple(blocks.shape) == (n, num_layers, 2, *k_cache.shape[2:]), blocks.shape
    if n == 0:
        return
    grid, layer_stride, block_stride, block_elems = _copy_grid(k_cache, v_cache, n)
    _scatter_blocks_kernel[grid](
        k_cache, v_cache, blocks.contiguous(), block_ids.to(torch.int64).contiguous(),
        layer_stride, block_stride, block_elems, num_layers, CHUNK=_COPY_CHUNK)


def gather_blocks(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor) -> Tensor:
    if _use_triton(k_cache):
        return gather_blocks_triton(k_cache, v_cache, block_ids)
    return reference_gather_blocks(k_cache, v_cache, block_ids)


def scatter_blocks(k_cache: Tensor, v_cache: Tensor, block_ids: Tensor, blocks: Tensor) -> None:
    if _use_triton(k_cache):
        scatter_blocks_triton(k_cache, v_cache, block_ids, blocks)
    else:
        reference_scatter_blocks(k_cache, v_cache, block_ids, blocks)


# ---- paged decode attention ---------------------------------------------------------------------


def reference_paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    scale: float, sliding_window: int | None = None,
) -> Tensor:
    """q [S, H, hd] (each sequence's one new token, already written to the cache), one layer's
    cache [num_blocks, B, n_kv, hd] (strided over blocks or not), block_table [S, max_blocks],
    seq_lens [S] (keys per sequence, the new token included) -> [S, H, hd]."""
    s, num_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    flat = block_table.reshape(-1)
    keys = k_cache.index_select(0, flat).view(s, max_blocks * block_size, n_kv, hd)
    values = v_cache.index_select(0, flat).view(s, max_blocks * block_size, n_kv, hd)
    pos = torch.arange(max_blocks * block_size, device=q.device)
    mask = pos[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] >= seq_lens[:, None] - sliding_window
    group = num_heads // n_kv
    qg = q.float().view(s, n_kv, group, hd)
    scores = torch.einsum("skgd,stkd->skgt", qg, keys.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("skgt,stkd->skgd", scores.softmax(-1), values.float())
    return out.reshape(s, num_heads, hd).to(q.dtype)


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, scale, window,
                         max_blocks, block_stride, num_heads, num_kv_heads, head_dim, group,
                         BLOCK_SIZE: tl.constexpr, GROUP_P: tl.constexpr, DIM_P: tl.constexpr):
    # One program per (sequence, KV head): the query heads sharing that KV head read each key
    # once. Online softmax over the sequence's blocks, in float32.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, DIM_P)
    t = tl.arange(0, BLOCK_SIZE)
    g_ok = g < group
    d_ok = d < head_dim
    head = kv_head * group + g
    q_off = (seq.to(tl.int64) * num_heads + head)[:, None] * head_dim + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    first = tl.maximum(seq_len - window, 0)
    m = tl.full((GROUP_P,), float("-inf"), tl.float32)
    denom = tl.zeros((GROUP_P,), tl.float32)
    acc = tl.zeros((GROUP_P, DIM_P), tl.float32)
    for j in range(first // BLOCK_SIZE, tl.cdiv(seq_len, BLOCK_SIZE)):
        block_id = tl.load(table_ptr + seq.to(tl.int64) * max_blocks + j).to(tl.int64)
        pos = j * BLOCK_SIZE + t
        valid = (pos < seq_len) & (pos >= first)
        kv_off = block_id * block_stride \
            + ((t[:, None] * num_kv_heads + kv_head) * head_dim + d[None, :])
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    scale: float, sliding_window: int | None = None,
) -> Tensor:
    s, num_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    # Strided over blocks is fine (the engine's block-major cache is); within a block, not.
    assert k_cache.stride() == v_cache.stride() and k_cache[0].is_contiguous()
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert num_heads % n_kv == 0
    group = num_heads // n_kv
    q = q.contiguous()
    out = torch.empty_like(q)
    if s == 0:
        return out
    _paged_decode_kernel[(s, n_kv)](
        q, k_cache, v_cache, out, block_table.to(torch.int64).contiguous(),
        seq_lens.to(torch.int64).contiguous(), float(scale),
        _NO_WINDOW if sliding_window is None else int(sliding_window),
        block_table.shape[1], k_cache.stride(0), num_heads, n_kv, hd, group,
        BLOCK_SIZE=block_size, GROUP_P=triton.next_power_of_2(group),
        DIM_P=triton.next_power_of_2(hd))
    return out


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    scale: float, sliding_window: int | None = None,
) -> Tensor:
    if _use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_table, seq_lens, scale,
                                             sliding_window)
    return reference_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale,
                                            sliding_window)


# ---- int8 quantize / dequantize -----------------------------------------------------------------
#
# Symmetric int8 with one float32 scale per row of head_dim values, that is per token per KV head
# (per layer, K and V apart). Per block would cost less (one scale per 16 tokens) but one outlier
# token (the first token's keys often are, the attention-sink effect) would then coarsen all 16;
# per token-head keeps each token's own resolution for 4 bytes per head_dim values (6% at 64).


def reference_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., hd] -> (int8 [..., hd], float32 scales [...]) with x ~= q * scale, |error| at most
    scale / 2. A row of zeros gets scale 0."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, INT8_MAX / amax.clamp_min(_TINY), torch.zeros_like(amax))
    q = torch.floor(x * inv[..., None] + 0.5).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def reference_dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scales[..., None]).to(dtype)


@triton.jit
def _quantize_int8_kernel(x_ptr, q_ptr, s_ptr, rows, dim, ROWS: tl.constexpr,
                          DIM_P: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, DIM_P)
    mask = (r < rows)[:, None] & (d < dim)[None, :]
    off = r.to(tl.int64)[:, None] * dim + d[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(x * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + off, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + r, amax / 127.0, mask=r < rows)


@triton.jit
def _dequantize_int8_kernel(q_ptr, s_ptr, out_ptr, rows, dim, ROWS: tl.constexpr,
                            DIM_P: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, DIM_P)
    mask = (r < rows)[:, None] & (d < dim)[None, :]
    off = r.to(tl.int64)[:, None] * dim + d[None, :]
    q = tl.load(q_ptr + off, mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + r, mask=r < rows, other=0.0)
    tl.store(out_ptr + off, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


_QUANT_ROWS = 16


def quantize_int8_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    hd = x.shape[-1]
    flat = x.reshape(-1, hd).contiguous()
    rows = flat.shape[0]
    q = torch.empty(flat.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_int8_kernel[(triton.cdiv(rows, _QUANT_ROWS),)](
            flat, q, scales, rows, hd, ROWS=_QUANT_ROWS, DIM_P=triton.next_power_of_2(hd))
    return q.view(x.shape), scales.view(x.shape[:-1])


def dequantize_int8_triton(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    hd = q.shape[-1]
    flat = q.reshape(-1, hd).contiguous()
    rows = flat.shape[0]
    out = torch.empty(flat.shape, dtype=dtype, device=q.device)
    if rows:
        _dequantize_int8_kernel[(triton.cdiv(rows, _QUANT_ROWS),)](
            flat, scales.reshape(-1).float().contiguous(), out, rows, hd, ROWS=_QUANT_ROWS,
            DIM_P=triton.next_power_of_2(hd))
    return out.view(q.shape)


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    if _use_triton(x):
        return quantize_int8_triton(x)
    return reference_quantize_int8(x)


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    if _use_triton(q):
        return dequantize_int8_triton(q, scales, dtype)
    return reference_dequantize_int8(q, scales, dtype)
