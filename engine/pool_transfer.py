"""Moves KV blocks between an engine's paged cache and the pool.

Both phases use it: prefill stores the prompt's blocks, decode pulls them and stores the blocks its
own output completes. Every object read back is checked (header, fingerprint, shape, checksum)
before the engine uses it, so a bad or evicted object is a miss and the engine recomputes it.

A pull reads each payload straight into its cache block through the pool client's `read_into`
(the cache is block-major, so a block is one contiguous run in the pool's layout): on CPU the
copy out of the node (a memcpy from a shared-memory segment, or the socket's recv_into) is the
only one. The blocks a pull lands in are fresh blocks of the sequence, so the bytes of an object
that then fails its checks are overwritten when the engine computes that block. On a GPU, and
for int8, payloads land in one (pinned) staging buffer, then one copy to the device and one
scatter kernel. A store is one gather from the cache and one copy to the host. With
`pool_kv_dtype="int8"` a block is stored quantized: int8 values [L, 2, B, n_kv, hd], then one
float32 scale per token per KV head [L, 2, B, n_kv] (engine.triton_kernels.quantize_int8), and
dequantized on pull. Such objects have their own dtype name in the object header and their own
layout fingerprint (so their own block keys): int8 and full-precision blocks never meet.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch
import xxhash

from kvstore.block_object import BlockLayout, encoded_size
from kvstore.client import KVStoreClient
from kvstore.errors import KVStoreError
from kvstore.reader import CallerBufferError

from .engine_metrics import PoolClientMetrics
from .kv_cache import PagedKVCache
from .triton_kernels import dequantize_int8, quantize_int8

log = logging.getLogger(__name__)

KV_LAYOUT_VERSION = 1
# --pool-kv-dtype: "auto" stores blocks in the cache's own dtype (bit-exact round trips).
POOL_KV_DTYPES = ("auto", "int8")
# The object header's dtype for int8 blocks: values, then their per-token-head float32 scales.
INT8_POOL_DTYPE = "int8+f32scale"


def layout_fingerprint(
    model_id: str,
    weights_digest: str,
    dtype: torch.dtype,
    block_size: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    pool_kv_dtype: str = "auto",
) -> str:
    """Everything that changes the bytes of a block, folded into one short hex name."""
    if pool_kv_dtype not in POOL_KV_DTYPES:
        raise ValueError(f"pool_kv_dtype {pool_kv_dtype!r} is not one of {POOL_KV_DTYPES}")
    parts = [
        model_id,
        weights_digest,
        str(dtype).removeprefix("torch."),
        f"block={block_size}",
        f"layout={KV_LAYOUT_VERSION}",
        f"tp={tp_rank}/{tp_size}",
    ]
    if pool_kv_dtype != "auto":
        # Only when set, so the fingerprints (and keys) of full-precision blocks stay as they were.
        parts.append(f"pool={pool_kv_dtype}")
    return xxhash.xxh3_128_hexdigest("|".join(parts).encode())


class PoolTransfer:
    def __init__(
        self, client: KVStoreClient, cache: PagedKVCache, fingerprint: str,
        metrics: PoolClientMetrics, pool_kv_dtype: str = "auto",
    ) -> None:
        if pool_kv_dtype not in POOL_KV_DTYPES:
            raise ValueError(f"pool_kv_dtype {pool_kv_dtype!r} is not one of {POOL_KV_DTYPES}")
        self._client = client
        self._metrics = metrics
        self._cache = cache
        self._fingerprint = fingerprint
        self._int8 = pool_kv_dtype == "int8"
        self._shape = (cache.num_layers, 2, cache.block_size, cache.num_kv_heads, cache.head_dim)
        # Elements of one block, and (int8) of its scales: one per token per KV head.
        self._values = cache.num_layers * 2 * cache.block_size * cache.num_kv_heads * cache.head_dim
        self._scales = self._values // cache.head_dim
        if self._int8:
            self._dtype_name = INT8_POOL_DTYPE
            self.payload_nbytes = self._values + 4 * self._scales
        else:
            self._dtype_name = str(cache.dtype).removeprefix("torch.")
            self.payload_nbytes = self._values * cache.k.element_size()
        self._layout = BlockLayout(fingerprint, self._dtype_name, self._shape)

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    def load(self, keys: Sequence[str], block_ids: Sequence[int]) -> int:
        """Copies the longest run of leading blocks found intact in the pool into `block_ids`.

        Returns how many leading blocks were loaded; everything after the first miss is left for
        the caller to compute.
        """
        assert len(block_ids) >= len(keys)
        if not keys:
            return 0
        start = time.perf_counter()
        loaded = rejected = 0
        try:
            loaded, rejected = self._load(keys, block_ids)
            return loaded
        finally:
            m = self._metrics
            m.read_seconds.observe(time.perf_counter() - start)
            m.blocks_hit.inc(loaded)
            m.blocks_rejected.inc(rejected)
            m.blocks_missed.inc(len(keys) - loaded - rejected)

    def _load(self, keys: Sequence[str], block_ids: Sequence[int]) -> tuple[int, int]:
        """(blocks loaded, objects rejected)."""
        landing: _Landing | None = None
        try:
            match = self._client.match_prefix(list(keys))
            n = min(match.matched, len(keys))
            if n == 0:
                return 0, 0
            landing = self._landing(block_ids[:n])
            try:
                # Each payload straight into where it belongs, from the match's own (leased)
                # locations: no second master round trip, and on CPU the copy out of the node
                # is the only one. The client checks each object (key, layout, length,
                # checksum) after it lands.
                fetched = self._client.read_into(match, landing.buffers, self._layout)
            except CallerBufferError:
                # Some object is not this layout's size (another dtype's block, plain bytes):
                # read them the checking way, so the misfit is refused and counted as any is.
                landing = None
                fetched = self._client.read(match, self._layout)
        except (grpc.RpcError, KVStoreError) as exc:
            # The pool being unreachable costs speed, never an answer: compute instead.
            log.warning("pool read failed, computing the prefix instead: %s", _reason(exc))
            return 0, 0
        self._metrics.read_bytes.inc(fetched.nbytes)
        payloads: list[memoryview] = []
        rejected = 0
        for obj, why in zip(fetched.objects, fetched.rejected, strict=False):
            if why is not None:
                rejected = 1
                break
            if obj is None:
                break
            payload = memoryview(obj.payload).cast("B")
            if payload.nbytes != self.payload_nbytes:
                # Right header, wrong amount of data for it: a writer's bug. A miss, never KV.
                log.warning("pool object %s has %d payload bytes, expected %d", obj.key,
                            payload.nbytes, self.payload_nbytes)
                rejected = 1
                break
            payloads.append(payload)
        if landing is not None:
            landing.land(len(payloads))
        else:
            self._write(block_ids[: len(payloads)], payloads)
        return len(payloads), rejected

    def _landing(self, block_ids: Sequence[int]) -> _Landing:
        """Where a pull's payloads land, and what then moves them into the cache."""
        cache = self._cache
        if cache.device.type == "cpu" and not self._int8:
            # The cache blocks themselves (block-major, so each is one contiguous run): the
            # read is the only copy.
            views = [cache.block_view(b).view(-1).view(torch.uint8).numpy().data
                     for b in block_ids]
            return _Landing(views, lambda n: None)
        # A staging buffer (pinned for a GPU: one DMA), then one scatter; int8 dequantized.
        stage = torch.empty((len(block_ids), self.payload_nbytes), dtype=torch.uint8,
                            pin_memory=cache.device.type == "cuda")
        rows = stage.numpy()

        def land(n: int) -> None:
            if n:
                data = stage[:n].to(cache.device, non_blocking=True)
                cache.write_blocks(self._ids(block_ids[:n]), self._blocks(data))

        return _Landing([rows[i].data for i in range(len(block_ids))], land)

    def _write(self, block_ids: Sequence[int], payloads: Sequence[memoryview]) -> None:
        if not payloads:
            return
        cache = self._cache
        if cache.device.type == "cpu":
            # Straight from each payload into its block: no staging copy.
            for block_id, payload in zip(block_ids, payloads, strict=True):
                cache.write_block(block_id, self._blocks(_as_tensor(payload).view(1, -1))[0])
            return
        # One staging buffer, one copy to the device, one scatter kernel.
        staged = torch.from_numpy(np.stack([np.frombuffer(p, dtype=np.uint8) for p in payloads]))
        data = staged.pin_memory().to(cache.device, non_blocking=True)
        cache.write_blocks(self._ids(block_ids), self._blocks(data))

    def _blocks(self, data: torch.Tensor) -> torch.Tensor:
        """Payloads [n, payload bytes] (uint8) -> blocks [n, L, 2, B, n_kv, hd] in the cache's
        dtype, dequantized for int8."""
        n = data.shape[0]
        if self._int8:
            values = data[:, : self._values].view(torch.int8).view(n, *self._shape)
            scales = data[:, self._values:].contiguous().view(torch.float32).view(
                n, *self._shape[:-1])
            return dequantize_int8(values, scales, self._cache.dtype)
        return data.view(self._cache.dtype).view(n, *self._shape)

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        for block_id in block_ids:
            # A kernel would read or write out of bounds with a bad id: refuse it here.
            assert 0 <= block_id < self._cache.num_blocks, f"block id {block_id} out of range"
        return torch.tensor(list(block_ids), dtype=torch.int64).to(self._cache.device)

    def encode(self, block_ids: Sequence[int]) -> np.ndarray:
        """[n, payload bytes] on the host: the blocks as stored in the pool (one gather, one
        copy to the host)."""
        blocks = self._cache.read_blocks(self._ids(block_ids))
        n = blocks.shape[0]
        if self._int8:
            values, scales = quantize_int8(blocks)
            raw = torch.cat((values.view(n, -1).view(torch.uint8),
                             scales.view(n, -1).view(torch.uint8)), dim=1)
        else:
            raw = blocks.view(n, -1).view(torch.uint8)
        return raw.cpu().numpy()

    def _payloads(self, block_ids: Sequence[int]) -> list[memoryview]:
        """Each block as stored in the pool. On CPU at full precision, the cache blocks
        themselves, not copied: a stored block is full, so nothing writes it, and it is
        referenced until written (EngineCore.store_in_background), so it is not reused."""
        cache = self._cache
        if cache.device.type == "cpu" and not self._int8:
            return [cache.block_view(b).view(-1).view(torch.uint8).numpy().data
                    for b in block_ids]
        return [row.data for row in self.encode(block_ids)]

    def decode(self, block_ids: Sequence[int], raw: np.ndarray) -> None:
        """The inverse of `encode`: payloads [n, payload bytes] into the cache blocks."""
        assert raw.shape == (len(block_ids), self.payload_nbytes), raw.shape
        self._write(block_ids, [memoryview(row) for row in raw])

    def store(self, keys: Sequence[str], block_ids: Sequence[int]) -> int:
        """Writes the given cache blocks under `keys`; returns how many are now in the pool."""
        assert len(keys) == len(block_ids)
        if not keys:
            return 0
        items = list(zip(keys, self._payloads(block_ids), strict=True))
        start = time.perf_counter()
        try:
            stored = self._client.put_many(items, self._layout)
        except (grpc.RpcError, KVStoreError) as exc:
            log.warning("pool write failed, %d blocks not stored: %s", len(items), _reason(exc))
            stored = [False] * len(items)
        finally:
            self._metrics.write_seconds.observe(time.perf_counter() - start)
        self._metrics.blocks_stored.inc(sum(stored))
        self._metrics.written_bytes.inc(
            sum(encoded_size(self._fingerprint, self._dtype_name, self._shape,
                             self.payload_nbytes, len(key))
                for key, ok in zip(keys, stored, strict=True) if ok)
        )
        return sum(stored)


@dataclass(frozen=True)
class _Landing:
    buffers: list[memoryview]
    land: Callable[[int], None]  # the first n buffers hold checked payloads: into the cache


def _as_tensor(payload: memoryview) -> torch.Tensor:
    with warnings.catch_warnings():
        # Read-only is fine: the tensor is only read (copied into the cache), never written.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.frombuffer(payload, dtype=torch.uint8)


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)
