"""Decode steps replayed as CUDA graphs: one launch a step instead of one per kernel.

A SmolLM2-135M decode step is ~500 small kernels. On a lent H200 (bench/gpu_check.sh) an eager
step took 15 ms at 1 sequence in float32 and 26 ms in bfloat16 (the bfloat16 RMSNorm is six
kernels, float32's one), against well under a millisecond of GPU work: the host's launches were
the step. A graph of the step is captured once per padded batch size and replayed with the
step's inputs copied into its static buffers first.

What a graph fixes at capture: the batch size (a step of B sequences replays the smallest
captured size >= B, the extra rows attending to a scratch block that no sequence owns), the
width of the block table (the model's longest sequence, in blocks), and every tensor's address
(the inputs live in one static buffer, filled by one host-to-device copy a step). Only steps in
which every sequence computes one token are replayed; prompts and chunks run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from engine.attention_batch import AttentionBatch, DecodeGroup

if TYPE_CHECKING:
    from engine.runner import SeqStep

log = logging.getLogger(__name__)

# Batch sizes a graph is captured for; a larger decode batch runs eagerly.
GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
_FIELDS = 6  # ids, positions, slots, slot blocks, slot offsets, sequence lengths


@dataclass(frozen=True, eq=False)
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: Tensor  # [size, vocab], written by each replay
    batch: AttentionBatch  # its tensors are the graph's inputs: kept alive with it


class DecodeGraphs:
    """Captures and replays the decode step of `forward` (ids, positions, batch -> logits)."""

    def __init__(self, forward: Callable[[Tensor, Tensor, AttentionBatch], Tensor], *,
                 device: torch.device, block_size: int, max_blocks: int, scratch_block: int,
                 sliding_window: int | None) -> None:
        assert device.type == "cuda", "CUDA graphs need a CUDA device"
        self._forward = forward
        self.device = device
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.sliding_window = sliding_window
        top = GRAPH_SIZES[-1]
        # One buffer for every size: size s reads its first s * (_FIELDS + max_blocks) entries.
        self._static = torch.zeros(top * (_FIELDS + max_blocks), dtype=torch.int64,
                                   device=device)
        self._host = np.zeros(self._static.shape[0], dtype=np.int64)
        self._graphs: dict[int, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.disabled = False
        self.replays = 0

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    # ---- the step -------------------------------------------------------------------------
    def step(self, seqs: Sequence[SeqStep]) -> Tensor | None:
        """Float32 logits [len(seqs), vocab], or None where this step is not a graph's (some
        sequence computes several tokens, or too many sequences, or graphs are off)."""
        n = len(seqs)
        if self.disabled or n > GRAPH_SIZES[-1] or any(len(s.token_ids) != 1 for s in seqs):
            return None
        if any(s.start_pos // self.block_size >= self.max_blocks for s in seqs):
            return None
        size = next(s for s in GRAPH_SIZES if s >= n)
        if size not in self._graphs and not self._capture(size):
            return None
        self._fill(size, seqs)
        graph = self._graphs[size]
        graph.graph.replay()
        self.replays += 1
        # A copy: the next replay overwrites the graph's own logits.
        return graph.logits[:n].to(torch.float32, copy=True)

    def capture(self, up_to: int) -> int:
        """Captures every size a batch of up to `up_to` sequences replays, largest first (the
        smaller then reuse its memory); returns how many graphs there are."""
        sizes = [s for s in GRAPH_SIZES if s < up_to] + [s for s in GRAPH_SIZES if s >= up_to][:1]
        for size in sorted(sizes, reverse=True):
            if size not in self._graphs and not self._capture(size):
                break
        return len(self._graphs)

    # ---- inside ---------------------------------------------------------------------------
    def _views(self, size: int) -> tuple[Tensor, ...]:
        fields = self._static[: _FIELDS * size].view(_FIELDS, size)
        table = self._static[_FIELDS * size: size * (_FIELDS + self.max_blocks)]
        return (*fields.unbind(0), table)

    def _fill(self, size: int, seqs: Sequence[SeqStep]) -> None:
        """The step's inputs into the static buffer: one host-to-device copy."""
        bs = self.block_size
        used = size * (_FIELDS + self.max_blocks)
        host = self._host[:used]
        fields = host[: _FIELDS * size].reshape(_FIELDS, size)
        table = host[_FIELDS * size:].reshape(size, self.max_blocks)
        # Padding rows: token 0 at position 0 of the scratch block, one key long.
        fields[:] = 0
        fields[2] = self.scratch_block * bs
        fields[3] = self.scratch_block
        fields[5] = 1
        table[:] = self.scratch_block
        for i, s in enumerate(seqs):
            pos = s.start_pos
            block = s.block_table[pos // bs]
            fields[0, i] = s.token_ids[0]
            fields[1, i] = pos
            fields[2, i] = block * bs + pos % bs
            fields[3, i] = block
            fields[4, i] = pos % bs
            fields[5, i] = pos + 1
            blocks = pos // bs + 1
            table[i, :blocks] = s.block_table[:blocks]
        self._static[:used].copy_(torch.from_numpy(host))

    def _batch(self, size: int) -> tuple[Tensor, Tensor, AttentionBatch]:
        ids, positions, slots, blocks, offsets, lens, table = self._views(size)
        decode = DecodeGroup(
            rows=torch.arange(size, dtype=torch.int64, device=self.device),
            block_table=table, seq_lens=lens, max_blocks=self.max_blocks,
            block_size=self.block_size, sliding_window=self.sliding_window)
        batch = AttentionBatch(
            query_lens=(1,) * size, context_lens=(0,) * size, block_tables=(),
            slot_mapping=slots, block_size=self.block_size, slot_index=(blocks, offsets),
            sliding_window=self.sliding_window, decode=decode, prefill=None)
        return ids, positions, batch

    def _capture(self, size: int) -> bool:
        self._fill(size, [])  # every row a padding row: warm-up and capture write no real KV
        ids, positions, batch = self._batch(size)
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # compiles kernels and settles the allocator
                        self._forward(ids, positions, batch)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # Thread-local: the pool's transfer threads may use the device meanwhile.
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    logits = self._forward(ids, positions, batch)
        except RuntimeError as exc:
            # Something in the step cannot be captured (a host sync, say): eager from now on.
            log.warning("decode CUDA graphs off: capturing a %d-sequence step failed: %s",
                        size, exc)
            self.disabled = True
            return False
        self._graphs[size] = _Graph(graph, logits, batch)
        return True
