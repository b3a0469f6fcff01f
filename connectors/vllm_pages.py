"""vLLM's paged KV tensors seen as pages: one block of every layer is one pool object.

A stored object is a whole vLLM block as opaque pages: for each layer, that block's slice of the
layer's KV tensor, bytes as the attention backend keeps them (the CPU backend's page is
[num_kv_heads, block_size, 2 * head_size], head-major and K|V interleaved per token: not
token-major, so it is never reinterpreted, only copied back into a page of the same layout).
Payload shape (num_layers, page_elements) in the KV dtype, layer-major (DESIGN section 3).

Pages move as bytes through numpy views of the KV tensors: numpy's fancy-index copies run a
memcpy per page, where torch's index_copy_ on a strided source ran at a third of that speed;
and the buffers they move through are reused, already touched memory (`new_pages`): a fresh
100 MB buffer costs more in page faults than the copy into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvstore.block_object import BlockLayout


class PagedKV:
    """The KV tensors of one worker (CPU), gathered from and scattered into by block id."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int,
                 fingerprint: str) -> None:
        rows: list[np.ndarray] = []
        seen: set[int] = set()
        dtype: torch.dtype | None = None
        for name, t in kv_caches.items():
            # Layers that share one tensor (cross-layer KV sharing) are stored once.
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            dims = [d for d, n in enumerate(t.shape) if n == num_blocks]
            assert dims, f"layer {name}: no dimension of {num_blocks} blocks in {tuple(t.shape)}"
            assert dtype is None or t.dtype == dtype, "KV tensors of different dtypes"
            dtype = t.dtype
            # Block first, as bytes (any dtype, numpy has no bfloat16): row b is block b's page,
            # strided as the tensor is; writes through it land in the tensor.
            by_block = t.movedim(dims[0], 0)
            assert by_block.stride(-1) == 1, f"layer {name}: innermost dimension not contiguous"
            rows.append(by_block.view(torch.uint8).numpy())
        assert rows and dtype is not None, "no KV cache tensors registered"
        self.page_nbytes = rows[0][0].nbytes
        assert all(r[0].nbytes == self.page_nbytes for r in rows), (
            "KV tensors of different layouts in one connector")
        self.dtype = dtype
        self.page_elements = self.page_nbytes // dtype.itemsize
        self.num_layers = len(rows)
        self._rows = tuple(rows)
        self.layout = BlockLayout(fingerprint, str(dtype).removeprefix("torch."),
                                  (len(rows), self.page_elements))

    @property
    def block_nbytes(self) -> int:
        return self.num_layers * self.page_nbytes

    def new_pages(self, n: int) -> np.ndarray:
        """A buffer for n blocks, (n, num_layers, page bytes) uint8, written through so its
        memory is faulted in now rather than inside a step (np.zeros would map it lazily)."""
        pages = np.empty((n, self.num_layers, self.page_nbytes), np.uint8)
        pages.fill(0)
        return pages

    def gather(self, block_ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """The blocks' pages copied into `out` (or a new buffer), (n, num_layers, page bytes):
        after this returns vLLM may overwrite the blocks; the copy is what gets stored."""
        n = len(block_ids)
        pages = self.new_pages(n) if out is None else out[:n]
        assert pages.shape == (n, self.num_layers, self.page_nbytes)
        ids = np.asarray(block_ids, dtype=np.intp)
        for i, rows in enumerate(self._rows):
            pages[:, i] = rows[ids].reshape(n, -1)
        return pages

    def scatter(self, block_ids: Sequence[int], pages: np.ndarray) -> None:
        """Write pages (n, num_layers, page bytes) into the blocks."""
        n = len(block_ids)
        assert pages.shape == (n, self.num_layers, self.page_nbytes)
        ids = np.asarray(block_ids, dtype=np.intp)
        for i, rows in enumerate(self._rows):
            rows[ids] = pages[:, i].reshape(n, *rows.shape[1:])
