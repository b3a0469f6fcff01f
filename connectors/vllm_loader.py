"""Pool hits into vLLM's pages: read where the scheduler's lookup found them, check, copy in.

The scheduler's `match_prefix` already leased the blocks and says where each lives; the worker
reads from those locations (`KVStoreClient.read_into` of the match: no second master round
trip) into a staging buffer of its own, reused from load to load, and copies each good block's
pages into its vLLM block. Two copies of a block in all, one out of the segment (a memcpy over
shared memory on the same host) and one per layer into the pages, no allocation: the KV
tensors of one block are 30 separate runs (one per layer) that the pool client's one-buffer
reads cannot land in, so the staging buffer is where the object is checked whole (key, layout,
length, checksum) before any byte of it reaches vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from connectors.vllm_pages import PagedKV
from kvstore.block_object import Rejection, header_size
from kvstore.client import KVStoreClient, PrefixMatch

T = TypeVar("T")

# Bytes read back that are damaged (not merely of another writer): removed, so a later save
# puts a good copy under the key instead of every reader recomputing it forever.
DAMAGED = (Rejection.CHECKSUM, Rejection.LENGTH, Rejection.FORMAT)


def select(match: PrefixMatch, idxs: Sequence[int]) -> PrefixMatch:
    """The locations of `match` at `idxs`, as plain tuples (picklable: the scheduler hands
    them to the worker process)."""
    def column(values: Sequence[T]) -> tuple[T, ...]:
        # Epochs and tiers may be left out (empty) when every location has the default.
        return tuple(values[i] for i in idxs) if values else ()

    return PrefixMatch(column(match.keys), tuple(match.nodes), column(match.node_index),
                       column(match.offsets), column(match.lengths), column(match.epochs),
                       column(match.tiers))


@dataclass(frozen=True)
class LoadResult:
    loaded: int  # blocks now in place
    failed: tuple[int, ...]  # vLLM block ids not filled: missing, refused, unreachable
    damaged: tuple[str, ...]  # keys whose bytes came back damaged
    nbytes: int


class PoolLoader:
    def __init__(self, client: KVStoreClient, paged: PagedKV, staging_bytes: int) -> None:
        self._client = client
        self._paged = paged
        self._chunk = max(1, staging_bytes // paged.block_nbytes)
        self._staging = paged.new_pages(self._chunk)
        self._views = [memoryview(self._staging[j]).cast("B") for j in range(self._chunk)]

    def load(self, match: PrefixMatch, block_ids: Sequence[int]) -> LoadResult:
        """Fill `block_ids[i]` with the object at `match`'s location i. Raises what the client
        raises when the pool cannot be reached (every block then counts as failed)."""
        assert match.matched == len(block_ids)
        layout = self._paged.layout
        payload = self._paged.block_nbytes
        # A location of another size holds another layout's object (or damage): a miss without
        # reading it, as the client refuses buffers that do not fit.
        fits = [i for i in range(match.matched)
                if match.lengths[i] == header_size(match.keys[i], layout) + payload]
        fit = set(fits)
        failed = [block_ids[i] for i in range(match.matched) if i not in fit]
        damaged: list[str] = []
        loaded = nbytes = 0
        for start in range(0, len(fits), self._chunk):
            idxs = fits[start : start + self._chunk]
            fetched = self._client.read_into(select(match, idxs), self._views[: len(idxs)],
                                             layout)
            nbytes += fetched.nbytes
            good = [j for j, obj in enumerate(fetched.objects) if obj is not None]
            if len(good) == len(idxs):
                self._paged.scatter([block_ids[i] for i in idxs], self._staging[: len(idxs)])
            elif good:
                self._paged.scatter([block_ids[idxs[j]] for j in good], self._staging[good])
            loaded += len(good)
            failed += [block_ids[idxs[j]] for j, obj in enumerate(fetched.objects)
                       if obj is None]
            damaged += [match.keys[idxs[j]] for j, why in enumerate(fetched.rejected)
                        if why in DAMAGED]
        return LoadResult(loaded, tuple(failed), tuple(damaged), nbytes)
