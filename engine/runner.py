"""Runs one model step over a batch of sequences on the paged KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine import cpu_fused_ops, cpu_paged_attention
from engine.attention_batch import AttentionBatch
from engine.block_manager import BlockPool
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.errors import InvalidStep
from engine.kv_cache import PagedKVCache
from engine.loader import LoadedModel
from engine.model import LastRows
from kvstore.hashing import DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class SeqStep:
    """Compute token_ids at positions start_pos..; KV for [0, start_pos) is already cached."""

    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, *, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
        cuda_graphs: bool = False,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.loaded = loaded
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        self.block_size = block_size
        self.device = next(self.model.parameters()).device
        graphs = cuda_graphs and self.device.type == "cuda"
        # A graph's padding rows write and read one block that no sequence is given.
        total_blocks = num_blocks + 1 if graphs else num_blocks
        self.kv = PagedKVCache(
            num_layers=self.config.num_layers,
            num_blocks=total_blocks,
            block_size=block_size,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=loaded.dtype,
            device=str(self.device),
        )
        self.allocator = BlockPool(total_blocks)
        self.graphs: DecodeGraphs | None = None
        if graphs:
            self.graphs = DecodeGraphs(
                self._forward_logits, device=self.device, block_size=block_size,
                max_blocks=-(-self.config.max_position_embeddings // block_size),
                scratch_block=self.allocator.allocate(1)[0],
                sliding_window=self.config.sliding_window)
        if self.device.type == "cpu":
            # Built now (seconds, once a machine), not in a first step.
            cpu_paged_attention.available()
            cpu_fused_ops.available()
        elif self.device.type == "cuda":
            # torch would pick cuDNN's attention for bfloat16 prompts, and cuDNN builds a plan
            # for every new prompt length: on an H200, ~100 ms for each new length (620 ms for
            # the first) against 33 ms for a whole 512-token step once built. Flash attention
            # takes any length as it comes.
            torch.backends.cuda.enable_cudnn_sdp(False)
            self._warm_up()

    def _warm_up(self) -> None:
        """One short forward now, so a first request does not pay for the device's first
        kernels and library handles (1.4 s on an H200). It writes block 0 without taking it
        from the allocator: no block holds anything yet, and the allocator's order is kept."""
        self.step([SeqStep(tuple(range(1, min(self.block_size, 8) + 1)), 0, (0,))])

    def _forward_logits(self, ids: Tensor, positions: Tensor, batch: AttentionBatch) -> Tensor:
        return self.model.compute_logits(self.model(ids, positions, batch, self.kv))

    def _validate(self, seq: SeqStep) -> None:
        if not seq.token_ids:
            raise InvalidStep("SeqStep.token_ids must not be empty")
        if seq.start_pos < 0:
            raise InvalidStep(f"SeqStep.start_pos must be >= 0, got {seq.start_pos}")
        end = seq.start_pos + len(seq.token_ids)
        if end > self.config.max_position_embeddings:
            raise InvalidStep(
                f"sequence length {end} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if len(seq.block_table) * self.block_size < end:
            raise InvalidStep(
                f"SeqStep.block_table has {len(seq.block_table)} blocks of {self.block_size}, "
                f"needs {end} slots"
            )
        for block_id in seq.block_table:
            if not 0 <= block_id < self.kv.num_blocks:
                raise InvalidStep(f"SeqStep.block_table has invalid block id {block_id}")

    def _layout(self, seqs: Sequence[SeqStep], query_lens: list[int], context_lens: list[int]
                ) -> AttentionBatch:
        return AttentionBatch.build(
            query_lens=query_lens, context_lens=context_lens,
            block_tables=[s.block_table for s in seqs], block_size=self.block_size,
            device=self.device, sliding_window=self.config.sliding_window)

    def step(self, seqs: Sequence[SeqStep]) -> Tensor:
        """Float32 logits [len(seqs), vocab] at each sequence's last computed position."""
        if not seqs:
            raise InvalidStep("step() needs at least one SeqStep")
        for seq in seqs:
            self._validate(seq)
        if self.graphs is not None:
            replayed = self.graphs.step(seqs)
            if replayed is not None:
                return replayed
        ids: list[int] = []
        positions: list[int] = []
        for seq in seqs:
            ids.extend(seq.token_ids)
            positions.extend(range(seq.start_pos, seq.start_pos + len(seq.token_ids)))
        batch = self._layout(seqs, [len(s.token_ids) for s in seqs], [s.start_pos for s in seqs])
        last = None
        if len(ids) > len(seqs):  # some sequence computes several tokens: only its last is kept
            last = LastRows(
                rows=torch.tensor(batch.cu_query_lens[1:], dtype=torch.int64,
                                  device=self.device) - 1,
                batch=self._layout(seqs, [1] * len(seqs),
                                   [s.start_pos + len(s.token_ids) - 1 for s in seqs]))
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(ids, dtype=torch.int64, device=self.device),
                torch.tensor(positions, dtype=torch.int64, device=self.device),
                batch,
                self.kv,
                last,
            )
            logits = self.model.compute_logits(hidden)
        return logits.float()
