"""Moves KV blocks between an engine's paged cache and the pool.

Both phases use it: prefill stores the prompt's blocks, decode pulls them and stores the blocks its
own output completes. Every object read back is checked (header, fingerprint, shape, checksum)
before it touches the cache, so a bad or evicted object is a miss and the engine recomputes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import grpc
import torch
import xxhash

from kvstore.block_object import BlockLayout, BlockObject, encoded_size
from kvstore.client import KVStoreClient
from kvstore.errors import KVStoreError

from .engine_metrics import PoolClientMetrics
from .kv_cache import PagedKVCache

log = logging.getLogger(__name__)

KV_LAYOUT_VERSION = 1


def layout_fingerprint(
    model_id: str,
    weights_digest: str,
    dtype: torch.dtype,
    block_size: int,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> str:
    """Everything that changes the bytes of a block, folded into one short hex name."""
    parts = [
        model_id,
        weights_digest,
        str(dtype).removeprefix("torch."),
        f"block={block_size}",
        f"layout={KV_LAYOUT_VERSION}",
        f"tp={tp_rank}/{tp_size}",
    ]
    return xxhash.xxh3_128_hexdigest("|".join(parts).encode())


class PoolTransfer:
    def __init__(
        self, client: KVStoreClient, cache: PagedKVCache, fingerprint: str,
        metrics: PoolClientMetrics,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._cache = cache
        self._fingerprint = fingerprint
        self._dtype_name = str(cache.k.dtype).removeprefix("torch.")
        self._shape = (
            cache.k.shape[0],
            2,
            cache.k.shape[2],
            cache.k.shape[3],
            cache.k.shape[4],
        )
        self._layout = BlockLayout(fingerprint, self._dtype_name, self._shape)

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
        try:
            match = self._client.match_prefix(list(keys))
            if match.matched == 0:
                return 0, 0
            # Read from the match's own (leased) locations: no second master round trip. The
            # client checks each object's key, layout, length and checksum.
            fetched = self._client.read(match, self._layout)
        except (grpc.RpcError, KVStoreError) as exc:
            # The pool being unreachable costs speed, never an answer: compute instead.
            log.warning("pool read failed, computing the prefix instead: %s", _reason(exc))
            return 0, 0
        self._metrics.read_bytes.inc(fetched.nbytes)
        loaded = 0
        for obj, why, block_id in zip(fetched.objects, fetched.rejected, block_ids,
                                      strict=False):
            if why is not None:
                return loaded, 1
            if obj is None:
                break
            self._cache.write_block(block_id, self._to_tensor(obj))
            loaded += 1
        return loaded, 0

    def store(self, keys: Sequence[str], block_ids: Sequence[int]) -> int:
        """Writes the given cache blocks under `keys`; returns how many are now in the pool."""
        assert len(keys) == len(block_ids)
        if not keys:
            return 0
        items = []
        for key, block_id in zip(keys, block_ids, strict=True):
            data = self._cache.read_block(block_id)
            items.append((key, data.numpy().tobytes()))
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
            sum(encoded_size(self._fingerprint, self._dtype_name, self._shape, len(payload),
                             len(key))
                for (key, payload), ok in zip(items, stored, strict=True) if ok)
        )
        return sum(stored)

    def _to_tensor(self, obj: BlockObject) -> torch.Tensor:
        with warnings.catch_warnings():
            # Read-only is fine: the tensor is only copied into the cache, never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            flat = torch.frombuffer(obj.payload, dtype=self._cache.k.dtype)
        return flat.view(self._shape)


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)
