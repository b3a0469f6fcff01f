"""Paged KV cache: fixed-size blocks of K and V for every layer."""

from __future__ import annotations

import torch
from torch import Tensor


class PagedKVCache:
    """K and V stored as [num_layers, num_blocks, block_size, num_kv_heads, head_dim].

    A block id addresses the same slot range in every layer, so one block id is enough to move
    a chunk of a sequence's KV between the cache and the pool.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=self.device)
        elem = torch.empty((), dtype=dtype).element_size()
        self.block_nbytes: int = num_layers * 2 * block_size * num_kv_heads * head_dim * elem

    def _check_block(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block_id {block_id} out of range [0, {self.num_blocks})")

    def read_block(self, block_id: int) -> Tensor:
        """[L, 2, block_size, n_kv, hd] contiguous copy, layer-major (layer0 K,V, layer1 K,V..)."""
        self._check_block(block_id)
        return torch.stack((self.k[:, block_id], self.v[:, block_id]), dim=1).contiguous()

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's K and V of block `src` into block `dst`."""
        self._check_block(src)
        self._check_block(dst)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def write_block(self, block_id: int, data: Tensor) -> None:
        self._check_block(block_id)
        expected = (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"write_block data shape {tuple(data.shape)} != {expected}")
        data = data.to(device=self.device, dtype=self.dtype)
        self.k[:, block_id] = data[:, 0]
        self.v[:, block_id] = data[:, 1]
