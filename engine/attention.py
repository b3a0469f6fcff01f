"""Paged attention metadata and the torch reference attention over the paged cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


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
    ) -> AttentionBatch:
        slots: list[int] = []
        for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            assert len(table) * block_size >= ctx + q, "block table too short for step"
            for pos in range(ctx, ctx + q):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        return cls(
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            block_tables=tuple(tuple(t) for t in block_tables),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
        )


class AttentionFn(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
        batch: AttentionBatch, scale: float,
    ) -> Tensor: ...


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new K/V [T, n_kv, hd] into one layer's cache [num_blocks, block_size, n_kv, hd]."""
    n_kv, hd = k_cache.shape[-2:]
    k_cache.view(-1, n_kv, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def torch_paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    batch: AttentionBatch, scale: float,
) -> Tensor:
    """Reference paged attention: q [T, H, hd], k/v [T, n_kv, hd] -> [T, H, hd].

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
        if q_len > 1 and ctx == 0:
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
