"""vLLM's paged KV tensors seen as pages: one block of every layer is one pool object.

A stored object is a whole vLLM block as opaque pages: for each layer, that block's slice of the
layer's KV tensor, bytes as the attention backend keeps them (the CPU backend's page is
[num_kv_heads, block_size, 2 * head_size], head-major and K|V interleaved per token: not
token-major, so it is never reinterpreted, only copied back into a page of the same layout).
Payload shape (num_layers, page_elements) in the KV dtype, layer-major (DESIGN section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.block_object import BlockLayout


@dataclass(frozen=True)
class _Layer:
    tensor: torch.Tensor
    block_dim: int


class PagedKV:
    """The KV tensors of one worker, gathered from and scattered into by block id."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int,
                 fingerprint: str) -> None:
        layers: list[_Layer] = []
        seen: set[int] = set()
        for name, t in kv_caches.items():
            # Layers that share one tensor (cross-layer KV sharing) are stored once.
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            dims = [d for d, n in enumerate(t.shape) if n == num_blocks]
            assert dims, f"layer {name}: no dimension of {num_blocks} blocks in {tuple(t.shape)}"
            layers.append(_Layer(t, dims[0]))
        assert layers, "no KV cache tensors registered"
        first = layers[0].tensor
        self.page_shape = tuple(s for d, s in enumerate(first.shape) if d != layers[0].block_dim)
        self.page_elements = first.numel() // num_blocks
        for layer in layers:
            t = layer.tensor
            assert t.dtype == first.dtype and t.numel() // num_blocks == self.page_elements, (
                "KV tensors of different layouts in one connector")
        self.dtype = first.dtype
        self.layers = tuple(layers)
        self.layout = BlockLayout(fingerprint, str(first.dtype).removeprefix("torch."),
                                  (len(layers), self.page_elements))

    @property
    def block_nbytes(self) -> int:
        return len(self.layers) * self.page_elements * self.dtype.itemsize

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' pages, shape (n, num_layers, page_elements): after this returns
        vLLM may overwrite the blocks; the copy is what gets stored."""
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        out = torch.empty((len(block_ids), len(self.layers), self.page_elements),
                          dtype=self.dtype)
        for i, layer in enumerate(self.layers):
            pages = layer.tensor.index_select(layer.block_dim, ids)
            out[:, i] = pages.movedim(layer.block_dim, 0).reshape(len(block_ids), -1)
        return out

    def scatter(self, block_ids: Sequence[int], pages: torch.Tensor) -> None:
        """Write pages (n, num_layers, page_elements) into the blocks."""
        assert pages.shape == (len(block_ids), len(self.layers), self.page_elements)
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        for i, layer in enumerate(self.layers):
            src = pages[:, i].reshape(len(block_ids), *self.page_shape)
            layer.tensor.index_copy_(layer.block_dim, ids, src.movedim(0, layer.block_dim))

    def from_payloads(self, payloads: Sequence[memoryview | bytes]) -> torch.Tensor:
        """Stack verified payloads (each exactly one block) into (n, num_layers, page_elements)."""
        out = torch.empty((len(payloads), len(self.layers), self.page_elements),
                          dtype=self.dtype)
        # Through numpy: torch.frombuffer warns on the read-only buffers the pool hands back.
        flat = out.view(len(payloads), -1).view(torch.uint8).numpy()
        for i, p in enumerate(payloads):
            flat[i] = np.frombuffer(p, dtype=np.uint8)
        return out
