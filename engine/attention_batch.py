"""The layout of one flattened step for attention, built once per step (not per layer): which
tokens belong to which sequence, where their K/V go in the paged cache, and the two groups the
batched attention computes in one call each (engine.attention): sequences decoding one token,
and sequences computing several (prefill chunks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


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
            slot_index=split_slots(slot_mapping, block_size),
            sliding_window=sliding_window,
            decode=_decode_group(decode_rows, cu, context_lens, block_tables, block_size,
                                 device, sliding_window),
            prefill=_prefill_group(prefill_rows, cu, query_lens, context_lens, block_tables,
                                   block_size, device, sliding_window),
        )


def split_slots(slot_mapping: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
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
