"""A prefix match: the longest run of leading keys the pool holds, and where each one lives.

An engine asks for thousands of keys at once (8,192 blocks of 16 tokens for a 128k prompt), so
both directions are compact and cost a few C-level calls rather than Python work per key:

- the request carries block keys (32 lowercase hex characters) as their 16 raw bytes each,
  concatenated (`pack_keys` / `unpack_keys`), when every key is one; other keys go as strings;
- the answer carries no key (the caller has its own) and no message per location: the
  locations are columns (node index, offset, length, epoch, and tier only when some location
  is not in DRAM). A client that asks for `packed_columns` gets node index, offset and length
  as arrays of little-endian integers in bytes fields: one copy each to build and to read,
  where a repeated field costs a varint and a Python int per location both ways.
  The master builds them as arrays from its index's packed replicas
  (`kvstore.master_reads.PrefixRun`, `run_to_proto`) and the client keeps them as arrays
  (`PrefixMatch`); `PrefixMatch.locations` builds `BlockLocation`s only for a caller that asks
  for them (about 0.8 us each: more than the whole match costs per key). Reads of a match
  (`KVStoreClient.read`, `read_into`) never do: they plan each node's transfers from the
  columns (`kvstore.placement`).

`compact_to_proto` encodes the same form from replicas; the master no longer uses it (its
answers come from `run_to_proto`), and it stays as the reference encoder of the form's every
column (stale epochs, dropped nodes) that the decoder is tested against.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING, cast

from kvstore.errors import InvalidKeyError, RequestTooLargeError
from kvstore.metadata import DRAM, BlockLocation, NodeInfo, ObjectMeta
from kvstore.wire import node_from_proto
from pantry.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    from kvstore.master_reads import PrefixRun

KEY_BYTES = 16
_KEY_CHARS = 2 * KEY_BYTES


@dataclass(frozen=True)
class PrefixMatch:
    """`keys[i]` lives at (nodes[node_index[i]], offsets[i], lengths[i]) of registration
    epochs[i] (its node's, nodes[node_index[i]].epoch, when `epochs` is empty), in tier
    tiers[i] (every one in DRAM when `tiers` is empty).

    The columns are sequences as they came off the wire (protobuf's packed containers: no
    Python int per location is made until someone reads one); treat them as read-only."""

    keys: Sequence[str]
    nodes: tuple[NodeInfo, ...] = ()
    node_index: Sequence[int] = ()
    offsets: Sequence[int] = ()
    lengths: Sequence[int] = ()
    epochs: Sequence[int] = ()
    tiers: Sequence[str] = ()

    def __post_init__(self) -> None:
        n = len(self.keys)
        assert (len(self.node_index), len(self.offsets), len(self.lengths)) == (n, n, n), (
            "one location per matched key")
        assert not self.epochs or len(self.epochs) == n, "one epoch per location, or none"
        assert not self.tiers or len(self.tiers) == n, "one tier per location, or none"

    @property
    def matched(self) -> int:
        return len(self.keys)

    @cached_property
    def locations(self) -> tuple[BlockLocation, ...]:
        tiers = self.tiers or (DRAM,) * len(self.keys)
        ids = [self.nodes[i].node_id for i in self.node_index]
        epochs = self.epochs or [self.nodes[i].epoch for i in self.node_index]
        return tuple(BlockLocation(k, nid, off, n, ep, tier) for k, nid, off, n, ep, tier
                     in zip(self.keys, ids, self.offsets, self.lengths, epochs, tiers,
                            strict=True))


def pack_keys(keys: Sequence[str]) -> bytes | None:
    """The keys' 16 bytes each, concatenated, when every key is a block key (exactly 32
    lowercase hex characters); None when one is not."""
    if not keys:
        return b""
    # Spaced, the keys are what `bytes.hex` writes with a space every 16 bytes: one C call
    # each way and a comparison check every key's length and characters at once.
    spaced = " ".join(keys)
    if len(spaced) != (_KEY_CHARS + 1) * len(keys) - 1:
        return None
    try:
        packed = bytes.fromhex(spaced)
    except ValueError:
        return None
    # fromhex also takes upper case and spaces between any two bytes: only an exact round
    # trip is a run of block keys.
    return packed if packed.hex(" ", KEY_BYTES) == spaced else None


def unpack_keys(packed: bytes, max_keys: int) -> list[str]:
    if len(packed) % KEY_BYTES:
        raise InvalidKeyError("packed_keys", f"{len(packed)} bytes is not a whole number of "
                                             f"{KEY_BYTES}-byte keys")
    if len(packed) // KEY_BYTES > max_keys:
        raise RequestTooLargeError(f"packed_keys: {len(packed) // KEY_BYTES} keys in one "
                                   f"request; max_keys_per_request is {max_keys}")
    if not packed:
        return []
    # A space between every 16 bytes, then split: the keys without a Python step per key.
    return packed.hex(" ", KEY_BYTES).split(" ")


_NODE_ID, _OFFSET, _LENGTH = attrgetter("node_id"), attrgetter("offset"), attrgetter("length")
_EPOCH, _TIER = attrgetter("epoch"), attrgetter("tier")


def _le(column: array[int]) -> bytes:
    """The column's bytes, little-endian whatever this machine's order (the column is left
    as it was)."""
    if sys.byteorder != "little":
        column = array(column.typecode, column)
        column.byteswap()
    return column.tobytes()


def _from_le(code: str, data: bytes) -> array[int]:
    column = array(code)
    assert column.itemsize == {"I": 4, "Q": 8}[code], "uint32 and uint64 columns"
    if len(data) % column.itemsize:
        raise ValueError(f"a packed column of {len(data)} bytes: not whole "
                         f"{column.itemsize}-byte integers")
    column.frombytes(data)
    if sys.byteorder != "little":
        column.byteswap()
    return column


def compact_to_proto(metas: Sequence[ObjectMeta], nodes: Sequence[pb.NodeInfo],
                     resp: pb.MatchPrefixResponse, packed: bool = False, *,
                     current: bool = False, dram_only: bool = False) -> None:
    """Fill `resp`'s compact form with `metas`, truncated before the first whose node is not
    in `nodes` (dropped since the lookup: it and what follows would be misses); `packed`: the
    columns as packed bytes (fields 12 to 14).

    What the caller knows saves a pass over the thousands of locations each: `current`, that
    `nodes` were read with `metas` (every location's node is among them, and its epoch is that
    node's); `dram_only`, that every location is in DRAM."""
    index = {n.node_id: i for i, n in enumerate(nodes)}
    if len(index) == 1 and (current or set(map(_NODE_ID, metas)) <= index.keys()):
        node_index = [0] * len(metas)  # one node: nothing to look up
    else:
        looked = list(map(index.get, map(_NODE_ID, metas)))
        if None in looked:
            metas = metas[: looked.index(None)]
        node_index = cast(list[int], looked[: len(metas)])
    resp.matched = len(metas)
    if packed:
        if len(nodes) > 1:
            resp.node_index_packed = _le(array("I", node_index))
        resp.offsets_packed = _le(array("Q", map(_OFFSET, metas)))
        resp.lengths_packed = _le(array("Q", map(_LENGTH, metas)))
    else:
        resp.node_index.extend(node_index)
        resp.offsets.extend(map(_OFFSET, metas))
        resp.lengths.extend(map(_LENGTH, metas))
    # Locations almost always belong to their node's current registration: then the column
    # is left out (an epoch is 7 bytes on the wire, a third of a location).
    if not current:
        epochs = list(map(_EPOCH, metas))
        if len(nodes) == 1:
            same = epochs.count(nodes[0].epoch) == len(epochs)
        else:
            same = epochs == list(map([n.epoch for n in nodes].__getitem__, node_index))
        if not same:
            resp.epochs.extend(epochs)
    tiers = [] if dram_only else list(map(_TIER, metas))
    if tiers.count(DRAM) != len(tiers):
        names = sorted(set(tiers))
        at = {t: i for i, t in enumerate(names)}
        resp.tier_names.extend(names)
        resp.tiers.extend(map(at.__getitem__, tiers))


def run_to_proto(run: PrefixRun, resp: pb.MatchPrefixResponse, packed: bool = False) -> None:
    """Fill `resp`'s compact form with the master's answer `run` (its nodes, in order, are
    `resp.nodes`); `packed`: the columns as packed bytes (fields 12 to 14). The columns are
    the run's own: a copy each, no Python object per location."""
    n = resp.matched = run.matched
    if packed:
        if run.node_index is not None:  # left out when every location is on the first node
            resp.node_index_packed = _le(run.node_index)
        resp.offsets_packed = _le(run.offsets)
        resp.lengths_packed = _le(run.lengths)
    else:
        resp.node_index.extend([0] * n if run.node_index is None else run.node_index)
        resp.offsets.extend(run.offsets)
        resp.lengths.extend(run.lengths)
    # Every location is of its node's current registration: no epoch column.
    if run.tiers:
        names = sorted(set(run.tiers))
        at = {t: i for i, t in enumerate(names)}
        resp.tier_names.extend(names)
        resp.tiers.extend(map(at.__getitem__, run.tiers))


def run_to_locations(run: PrefixRun, resp: pb.MatchPrefixResponse) -> None:
    """Fill `resp`'s old form with `run`: a Location message per matched key (a caller that
    did not ask for the compact form)."""
    resp.matched = run.matched
    ids = [n.node_id for n in run.nodes]
    epochs = [n.epoch for n in run.nodes]  # every location is of its node's registration
    at: Iterable[int] = repeat(0) if run.node_index is None else run.node_index
    resp.locations.extend(
        pb.Location(key=k, node_id=ids[i], offset=off, length=n, epoch=epochs[i], tier=tier)
        for k, i, off, n, tier in zip(run.keys, at, run.offsets, run.lengths,
                                      run.tiers or repeat(DRAM), strict=False))


def compact_from_proto(keys: Sequence[str], resp: pb.MatchPrefixResponse) -> PrefixMatch:
    """The match `resp` answers for `keys` (the keys asked, in order)."""
    n = resp.matched
    names = tuple(resp.tier_names)
    nodes = tuple(node_from_proto(x) for x in resp.nodes)
    node_index: Sequence[int] = resp.node_index
    offsets: Sequence[int] = resp.offsets
    lengths: Sequence[int] = resp.lengths
    if resp.offsets_packed or resp.lengths_packed:
        offsets = _from_le("Q", resp.offsets_packed)
        lengths = _from_le("Q", resp.lengths_packed)
        # Left out when every location is on the first node: n zeros.
        node_index = (_from_le("I", resp.node_index_packed) if resp.node_index_packed
                      else array("I", bytes(4 * n)) if nodes else ())
    sent = bool(resp.node_index_packed or resp.node_index)  # else zeros: nothing to check
    if not len(node_index) == len(offsets) == len(lengths) == n or (
            n and sent and max(node_index) >= len(nodes)):
        raise ValueError(f"a prefix match of {n} locations with columns of "
                         f"{len(node_index)}, {len(offsets)} and {len(lengths)} over "
                         f"{len(nodes)} nodes")
    return PrefixMatch(keys[:n], nodes, node_index, offsets, lengths, resp.epochs,
                       tuple(names[i] for i in resp.tiers))

