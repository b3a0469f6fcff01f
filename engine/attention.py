"""Paged attention metadata and attention over the paged cache: the batched implementation the
engine runs (one call per group of sequences per layer) and the per-sequence torch reference it is
checked and benchmarked against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import cpu_paged_attention, cpu_prefill_attention
from engine.triton_kernels import paged_decode_attention


@dataclass(frozen=True, eq=False)
class DecodeGroup:
    """Sequences computing one token each, attended in one call: keys padded to the longest."""

    rows: Tensor          # [B] int64: each sequence's token in the flattened step
    block_table: Tensor   # [B * max_blocks] int64, padded with each row's own first block
    seq_lens: Tensor      # [B] int64: keys per sequence, the new token included
    max_blocks: int
    block_size: int
    sliding_window: int | None = None

    # The masks only the torch path reads (the CUDA and CPU kernels read seq_lens): made on
    # first use, once a step rather than once a layer. Made every step, they cost 9 ms a step at
    # 8 sequences of 4k tokens on a busy 2-core machine (0.07 ms at 256 tokens).
    @cached_property
    def key_mask(self) -> Tensor:
        """[B, 1, 1, max_blocks * block_size] bool: the keys each sequence attends to."""
        key_pos = torch.arange(self.max_blocks * self.block_size, device=self.seq_lens.device)
        lens = self.seq_lens[:, None]
        mask = key_pos[None, :] < lens
        if self.sliding_window is not None:
            mask &= key_pos[None, :] >= lens - self.sliding_window
        return mask[:, None, None, :]

    @cached_property
    def key_bias(self) -> Tensor:
        """key_mask as float32 0 / -inf, what SDPA turns a bool mask into on every call."""
        mask = self.key_mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


@dataclass(frozen=True, eq=False)
class PrefillGroup:
    """Sequences computing several tokens each, attended in one call with queries padded to the
    longest. Padding rows repeat their sequence's last token and are dropped afterwards."""

    rows: Tensor          # [P * max_q] int64: flattened token per padded query slot
    valid: Tensor         # [N] int64: the padded slots that are real tokens, in order
    out_rows: Tensor      # [N] int64: where each of those goes in the flattened step
    block_table: Tensor   # [P * max_blocks] int64, padded with each row's own first block
    num_seqs: int
    max_q: int
    max_blocks: int
    block_size: int
    # Per sequence: its first row in the step, its new tokens, its cached tokens.
    firsts: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    sliding_window: int | None = None
    # One sequence alone (no padding, no window to apply): (its first row, its cached tokens).
    # It is attended without a mask (`_lone_prefill`).
    lone: tuple[int, int] | None = None

    # Only the path that reads them makes these, once a step rather than once a layer: the CPU
    # kernel reads `sequences`, torch's masked call `mask`. The mask is [P, max_q, keys]: ~7 ms
    # a step for 4 x 512 new tokens after 4096 cached.
    @cached_property
    def sequences(self) -> Tensor:
        """[P, 3] int64 on the CPU: first row, new tokens, cached tokens of each sequence."""
        return torch.tensor(list(zip(self.firsts, self.query_lens, self.context_lens,
                                     strict=True)), dtype=torch.int64).view(-1, 3)

    @cached_property
    def mask(self) -> Tensor:
        """[P, 1, max_q, max_blocks * block_size] bool: query j of a sequence sits at position
        ctx + j and sees keys 0 .. ctx + j (and none a window or more behind); a padding query
        sees what its sequence's last token sees, so no row of the mask is empty."""
        device = self.block_table.device
        j = torch.arange(self.max_q, device=device)
        q_lens = torch.tensor(self.query_lens, dtype=torch.int64, device=device)
        ctx = torch.tensor(self.context_lens, dtype=torch.int64, device=device)
        query_pos = ctx[:, None] + torch.minimum(j[None, :], q_lens[:, None] - 1)
        key_pos = torch.arange(self.max_blocks * self.block_size, device=device)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]
        if self.sliding_window is not None:
            mask &= key_pos[None, None, :] > query_pos[:, :, None] - self.sliding_window
        return mask[:, None]


@dataclass(frozen=True, eq=False)
class AttentionBatch:
    """Layout of one flattened step: sequence i owns tokens [cu_query_lens[i], cu_query_lens[i+1]).

    context_lens[i] tokens of sequence i are already in the cache; its new tokens sit at positions
    context_lens[i] .. context_lens[i] + query_lens[i] - 1.
    """

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    slot_mapping: Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) per token
    block_size: int
    # slot_mapping as (block ids, offsets in the block): what `write_kv` indexes the cache with,
    # split once a step rather than once a layer. None: split on each write.
    slot_index: tuple[Tensor, Tensor] | None = None
    sliding_window: int | None = None
    # The batched implementation's view of the same step, built once per step (not per layer):
    # sequences with one new token, and sequences with several (prefill chunks).
    decode: DecodeGroup | None = None
    prefill: PrefillGroup | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def cu_query_lens(self) -> tuple[int, ...]:
        out = [0]
        for q in self.query_lens:
            out.append(out[-1] + q)
        return tuple(out)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
    ) -> AttentionBatch:
        slots: list[int] = []
        for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            assert len(table) * block_size >= ctx + q, "block table too short for step"
            for pos in range(ctx, ctx + q):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        decode_rows = [i for i, q in enumerate(query_lens) if q == 1]
        prefill_rows = [i for i, q in enumerate(query_lens) if q > 1]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        return cls(
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            block_tables=tuple(tuple(t) for t in block_tables),
            slot_mapping=slot_mapping,
            block_size=block_size,
            slot_index=_slot_index(slot_mapping, block_size),
            sliding_window=sliding_window,
            decode=_decode_group(decode_rows, cu, context_lens, block_tables, block_size,
                                 device, sliding_window),
            prefill=_prefill_group(prefill_rows, cu, query_lens, context_lens, block_tables,
                                   block_size, device, sliding_window),
        )


def _slot_index(slot_mapping: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return slot_mapping // block_size, slot_mapping % block_size


def _padded_tables(
    rows: Sequence[int], totals: Sequence[int], block_tables: Sequence[Sequence[int]],
    block_size: int,
) -> tuple[list[int], int]:
    max_blocks = max(-(-t // block_size) for t in totals)
    flat: list[int] = []
    for i, total in zip(rows, totals, strict=True):
        table = list(block_tables[i][: -(-total // block_size)])
        flat.extend(table + [table[0]] * (max_blocks - len(table)))
    return flat, max_blocks


def _decode_group(
    rows: list[int], cu: list[int], context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]], block_size: int, device: torch.device | str,
    sliding_window: int | None,
) -> DecodeGroup | None:
    if not rows:
        return None
    totals = [context_lens[i] + 1 for i in rows]
    flat, max_blocks = _padded_tables(rows, totals, block_tables, block_size)
    return DecodeGroup(
        rows=torch.tensor([cu[i] for i in rows], dtype=torch.int64, device=device),
        block_table=torch.tensor(flat, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(totals, dtype=torch.int64, device=device),
        max_blocks=max_blocks,
        block_size=block_size,
        sliding_window=sliding_window,
    )


def _prefill_group(
    rows: list[int], cu: list[int], query_lens: Sequence[int], context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]], block_size: int, device: torch.device | str,
    sliding_window: int | None,
) -> PrefillGroup | None:
    if not rows:
        return None
    max_q = max(query_lens[i] for i in rows)
    totals = [context_lens[i] + query_lens[i] for i in rows]
    flat, max_blocks = _padded_tables(rows, totals, block_tables, block_size)
    slots: list[int] = []
    valid: list[bool] = []
    for i in rows:
        q = query_lens[i]
        slots.extend(range(cu[i], cu[i] + q))
        slots.extend([cu[i] + q - 1] * (max_q - q))
        valid.extend([True] * q + [False] * (max_q - q))
    lone = None
    windowed = sliding_window is not None and max(totals) > sliding_window
    # A cached prefix takes a second attention call merged by log-sum-exp, through the CPU
    # flash kernel (the one that returns it): elsewhere such a chunk takes the mask.
    if (len(rows) == 1 and not windowed
            and (context_lens[rows[0]] == 0 or torch.device(device).type == "cpu")):
        lone = (cu[rows[0]], context_lens[rows[0]])
    return PrefillGroup(
        rows=torch.tensor(slots, dtype=torch.int64, device=device),
        valid=torch.tensor(valid, device=device).nonzero().flatten(),
        out_rows=torch.tensor([t for t, ok in zip(slots, valid, strict=True) if ok],
                              dtype=torch.int64, device=device),
        block_table=torch.tensor(flat, dtype=torch.int64, device=device),
        num_seqs=len(rows),
        max_q=max_q,
        max_blocks=max_blocks,
        block_size=block_size,
        firsts=tuple(cu[i] for i in rows),
        query_lens=tuple(query_lens[i] for i in rows),
        context_lens=tuple(context_lens[i] for i in rows),
        sliding_window=sliding_window,
        lone=lone,
    )


class AttentionFn(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
        batch: AttentionBatch, scale: float,
    ) -> Tensor: ...


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new K/V [T, n_kv, hd] into one layer's cache [num_blocks, block_size, n_kv, hd].
    The cache is a view strided over blocks (engine.kv_cache keeps blocks block-major), so it
    is indexed by (block, offset), never reshaped: a reshape would copy and the write be lost."""
    _scatter_kv(k, v, k_cache, v_cache, _slot_index(slot_mapping, k_cache.shape[1]))


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
    if batch.slot_index is None:
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    else:
        _scatter_kv(k, v, k_cache, v_cache, batch.slot_index)
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
