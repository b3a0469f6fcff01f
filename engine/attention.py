"""Attention over the paged cache: the batched implementation the engine runs (one call per group
of sequences per layer, engine.attention_batch says how a step is grouped) and the per-sequence
torch reference it is checked and benchmarked against."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import cpu_paged_attention, cpu_prefill_attention
from engine.attention_batch import AttentionBatch, DecodeGroup, split_slots
from engine.triton_kernels import paged_decode_attention


class AttentionFn(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
        batch: AttentionBatch, scale: float,
    ) -> Tensor: ...


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new K/V [T, n_kv, hd] into one layer's cache [num_blocks, block_size, n_kv, hd].
    The cache is a view strided over blocks (engine.kv_cache keeps blocks block-major), so it
    is indexed by (block, offset), never reshaped: a reshape would copy and the write be lost."""
    _scatter_kv(k, v, k_cache, v_cache, split_slots(slot_mapping, k_cache.shape[1]))


def write_step_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                  batch: AttentionBatch) -> None:
    """Every new token's K/V of the step into one layer's cache."""
    if batch.slot_index is None:
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    else:
        _scatter_kv(k, v, k_cache, v_cache, batch.slot_index)


def _scatter_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                index: tuple[Tensor, Tensor]) -> None:
    k_cache.index_put_(index, k.to(k_cache.dtype))
    v_cache.index_put_(index, v.to(v_cache.dtype))


def _gather(cache: Tensor, table: Tensor, num_seqs: int) -> Tensor:
    """[num_seqs, n_kv, max_blocks * block_size, hd] keys or values of each sequence."""
    n_kv, hd = cache.shape[-2:]
    return cache.index_select(0, table).view(num_seqs, -1, n_kv, hd).transpose(1, 2)


def batched_paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    batch: AttentionBatch, scale: float,
) -> Tensor:
    """Paged attention with one SDPA call for every decoding sequence and one for every prefill
    chunk of the step: q [T, H, hd], k/v [T, n_kv, hd] -> [T, H, hd]. Same results as
    `reference_paged_attention`, which loops over sequences."""
    write_step_kv(k, v, k_cache, v_cache, batch)
    num_heads, hd = q.shape[1:]
    n_kv = k_cache.shape[-2]
    dec, pre = batch.decode, batch.prefill
    if pre is None and dec is not None and dec.rows.shape[0] == q.shape[0]:
        return _decode(q, k_cache, v_cache, dec, scale)
    out = torch.empty_like(q)
    if dec is not None:
        out[dec.rows] = _decode(q.index_select(0, dec.rows), k_cache, v_cache, dec, scale)
    if pre is not None and cpu_prefill_attention.supports(q, k_cache, v_cache):
        # Every prefill sequence in one C call, read in place from the cache.
        cpu_prefill_attention.prefill_attention(
            q, k_cache, v_cache, pre.sequences, pre.block_table, scale, pre.sliding_window, out)
    elif pre is not None and pre.lone is not None:
        start, context = pre.lone
        end = start + pre.max_q
        attn = _lone_prefill(q[start:end], k[start:end], v[start:end], k_cache, v_cache,
                             pre.block_table, context, scale)
        if dec is None:
            return attn  # the step is this one sequence
        out[start:end] = attn
    elif pre is not None:
        qs = q.index_select(0, pre.rows).view(pre.num_seqs, pre.max_q, num_heads, hd)
        keys = _gather(k_cache, pre.block_table, pre.num_seqs)
        values = _gather(v_cache, pre.block_table, pre.num_seqs)
        attn = F.scaled_dot_product_attention(
            qs.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=pre.mask,
            scale=scale, enable_gqa=n_kv != num_heads,
        )
        flat = attn.transpose(1, 2).reshape(-1, num_heads, hd)
        out[pre.out_rows] = flat.index_select(0, pre.valid)
    return out


def _lone_prefill(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
    context: int, scale: float,
) -> Tensor:
    """One sequence's new tokens q [T, H, hd], k/v [T, n_kv, hd] after `context` cached ones ->
    [T, H, hd].

    The new tokens attend to themselves causally, straight from k and v. A cached prefix is a
    second call without a mask, its query heads grouped by the KV head they share
    ([1, n_kv, group * T, hd]: no KV head repeated), and the two are merged by their
    log-sum-exp, which is exact. One call over prefix + chunk would need a [T, context + T]
    mask: the kernel then computes every masked score and takes the small-query blocking
    (on SmolLM2's shapes, a 512-token chunk after 1536 cached tokens: 36 vs 32 ms a layer)."""
    t, num_heads, hd = q.shape
    n_kv = k.shape[1]
    group = num_heads // n_kv
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if not context:
        attn = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                              enable_gqa=group > 1)
        return attn[0].transpose(0, 1)
    if group > 1:  # the CPU flash kernel takes as many KV heads as query heads
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    own, own_lse = _flash_cpu(qh, kh, vh, is_causal=True, scale=scale)[:2]
    blocks = -(-context // k_cache.shape[1])
    keys = _gather(k_cache, block_table[:blocks], 1)[:, :, :context].to(q.dtype)
    values = _gather(v_cache, block_table[:blocks], 1)[:, :, :context].to(q.dtype)
    grouped = q.view(t, n_kv, group, hd).permute(1, 2, 0, 3).reshape(1, n_kv, group * t, hd)
    past, past_lse = _flash_cpu(grouped, keys, values, scale=scale)[:2]
    past = past.reshape(n_kv, group, t, hd).permute(2, 0, 1, 3).reshape(t, num_heads, hd)
    past_lse = past_lse.reshape(n_kv, group, t).permute(2, 0, 1).reshape(t, num_heads)
    # softmax over prefix and chunk = each part's softmax weighted by its share of the total
    # exp-sum: the prefix's share is sigmoid(lse_past - lse_own).
    share = torch.sigmoid(past_lse - own_lse[0].transpose(0, 1)).unsqueeze(-1)
    return torch.lerp(own[0].transpose(0, 1), past, share.to(q.dtype))


# Scaled dot-product attention on CPU that also returns each query's log-sum-exp.
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, dec: DecodeGroup, scale: float
            ) -> Tensor:
    """q [B, H, hd] -> [B, H, hd]. The query heads sharing a KV head become that head's queries
    ([B, n_kv, H / n_kv, hd]), so no KV head is repeated."""
    b, num_heads, hd = q.shape
    if q.is_cuda:
        return paged_decode_attention(q, k_cache, v_cache, dec.block_table.view(b, -1),
                                      dec.seq_lens, scale, dec.sliding_window)
    if q.dtype == k_cache.dtype == torch.float32 and cpu_paged_attention.available():
        # Reads each block in place: no copy of every sequence's context, padded to the
        # longest, each layer of each step.
        return cpu_paged_attention.paged_decode_attention_cpu(
            q, k_cache, v_cache, dec.block_table.view(b, -1), dec.seq_lens, scale,
            dec.sliding_window)
    n_kv = k_cache.shape[-2]
    keys = _gather(k_cache, dec.block_table, b).to(q.dtype)
    values = _gather(v_cache, dec.block_table, b).to(q.dtype)
    attn = F.scaled_dot_product_attention(
        q.view(b, n_kv, num_heads // n_kv, hd), keys, values,
        # float32 queries take the float mask (made once a step); other dtypes the bool one.
        attn_mask=dec.key_bias if q.dtype == torch.float32 else dec.key_mask,
        scale=scale,
    )
    return attn.reshape(b, num_heads, hd)


def reference_paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    batch: AttentionBatch, scale: float,
) -> Tensor:
    """Reference paged attention, one sequence at a time: q [T, H, hd], k/v [T, n_kv, hd] ->
    [T, H, hd].

    Writes the new K/V first and then reads every key back from the cache, so prefill, prefill
    after a cached prefix, chunked prefill and decode all take the same path.
    """
    write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    n_kv, hd = k_cache.shape[-2:]
    block_size = batch.block_size
    out = torch.empty_like(q)
    cu = batch.cu_query_lens
    for i in range(batch.num_seqs):
        q_len, ctx = batch.query_lens[i], batch.context_lens[i]
        total = ctx + q_len
        n_blocks = (total + block_size - 1) // block_size
        table = torch.tensor(batch.block_tables[i][:n_blocks], dtype=torch.int64,
                             device=k_cache.device)
        keys = k_cache.index_select(0, table).reshape(-1, n_kv, hd)[:total]
        values = v_cache.index_select(0, table).reshape(-1, n_kv, hd)[:total]
        qs = q[cu[i]:cu[i + 1]].transpose(0, 1)  # [H, q_len, hd]
        mask = None
        causal = False
        window = batch.sliding_window
        if window is not None and total > window:
            # Query j sits at position ctx + j and may see keys ctx + j - window + 1 .. ctx + j.
            key_pos = torch.arange(total, device=q.device)
            query_pos = torch.arange(ctx, total, device=q.device)
            mask = ((key_pos[None, :] <= query_pos[:, None])
                    & (key_pos[None, :] > query_pos[:, None] - window))
        elif q_len > 1 and ctx == 0:
            # Plain prefill: the is_causal fast path avoids materialising a [q, k] mask.
            causal = True
        elif q_len > 1:
            # Query j sits at position ctx + j and may see keys 0 .. ctx + j.
            key_pos = torch.arange(total, device=q.device)
            query_pos = torch.arange(ctx, total, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        attn = F.scaled_dot_product_attention(
            qs, keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[cu[i]:cu[i + 1]] = attn.transpose(0, 1)
    return out
