"""Paged KV cache: fixed-size blocks of K and V for every layer."""

from __future__ import annotations

import torch
from torch import Tensor

from engine import triton_kernels


class PagedKVCache:
    """Blocks of K and V for every layer, stored block-major:
    `blocks` [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].

    One block's K and V of every layer are one contiguous run laid out exactly as the pool stores
    a block ([L, 2, B, n_kv, hd]), so a block pulled from the pool lands straight in the cache
    (`block_view`) and a block stored is one contiguous read. Attention sees per-layer views,
    `k` and `v` [num_layers, num_blocks, block_size, num_kv_heads, head_dim]; they are strided
    across blocks, so they are indexed by block and offset, never reshaped over blocks.
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
        self.blocks: Tensor = torch.zeros(
            (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), dtype=dtype,
            device=self.device)
        self.k: Tensor = self.blocks[:, :, 0].transpose(0, 1)
        self.v: Tensor = self.blocks[:, :, 1].transpose(0, 1)
        elem = torch.empty((), dtype=dtype).element_size()
        self.block_nbytes: int = num_layers * 2 * block_size * num_kv_heads * head_dim * elem

    def _check_block(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block_id {block_id} out of range [0, {self.num_blocks})")

    def read_block(self, block_id: int) -> Tensor:
        """[L, 2, block_size, n_kv, hd] contiguous copy, layer-major (layer0 K,V, layer1 K,V..)."""
        self._check_block(block_id)
        return self.blocks[block_id].clone()

    def block_view(self, block_id: int) -> Tensor:
        """The block itself, [L, 2, block_size, n_kv, hd] contiguous: writing it writes the
        cache (a pull lands here directly)."""
        self._check_block(block_id)
        return self.blocks[block_id]

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's K and V of block `src` into block `dst`."""
        self._check_block(src)
        self._check_block(dst)
        self.blocks[dst] = self.blocks[src]

    def read_blocks(self, block_ids: Tensor) -> Tensor:
        """[n, L, 2, block_size, n_kv, hd] contiguous: `read_block` of each id, in one gather
        (a Triton kernel on CUDA). `block_ids` is an int64 tensor on the cache's device."""
        return triton_kernels.gather_blocks(self.k, self.v, block_ids)

    def write_blocks(self, block_ids: Tensor, data: Tensor) -> None:
        """The inverse of `read_blocks`, in one scatter; `data` on the cache's device."""
        expected = (block_ids.numel(), self.num_layers, 2, self.block_size, self.num_kv_heads,
                    self.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"write_blocks data shape {tuple(data.shape)} != {expected}")
        triton_kernels.scatter_blocks(self.k, self.v, block_ids, data.to(self.dtype))

    def write_block(self, block_id: int, data: Tensor) -> None:
        self._check_block(block_id)
        expected = (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"write_block data shape {tuple(data.shape)} != {expected}")
        self.blocks[block_id] = data.to(device=self.device, dtype=self.dtype)
