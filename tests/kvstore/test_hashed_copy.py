"""The pool's hashed copy: bytes and digests exactly those of a plain copy and python-xxhash, at
every size and alignment the chunked, non-temporal path treats apart; and the shm transport that
uses it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore import block_object, hashed_copy
from kvstore.block_object import BlockLayout, PendingObject, Rejection, check_object
from kvstore.client import KVStoreClient
from kvstore.node_service import NodeServer
from kvstore.transports.shm import ShmTransport
from pantry.common.config_flags import MIB

# Around the 16 KB chunk and the 64-byte store step, and a SmolLM2 block (45 chunks exactly)
# with a ragged tail after it.
SIZES = [0, 1, 15, 16, 63, 64, 65, hashed_copy.CHUNK - 1, hashed_copy.CHUNK,
         hashed_copy.CHUNK + 1, 3 * hashed_copy.CHUNK + 40, 737_280, 737_280 + 7]
SOURCE = np.random.default_rng(7).integers(0, 256, 800_000, dtype=np.uint8)


def test_builds_here() -> None:
    # CI has a C compiler: the pool's reads must take the hashed copy there, not the fallback.
    assert hashed_copy.available(), hashed_copy._LIBRARY.unavailable_reason()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("misalign", [0, 1, 8, 16])
def test_copies_exactly_and_digests_as_xxhash(size: int, misalign: int) -> None:
    # A target 16-byte aligned takes the streaming stores, any other the plain memcpy.
    raw = np.zeros(size + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign
    target = raw[start : start + size]
    src_at = 5  # the source is never aligned: the copy loads it unaligned into the L1 buffer
    digests = hashed_copy.copy([hashed_copy.address(SOURCE.data) + src_at],
                               [target.data], [True])
    want = SOURCE[src_at : src_at + size]
    assert target.tobytes() == want.tobytes()
    assert digests == [xxhash.xxh3_64_intdigest(want.tobytes())]
    assert not raw[:start].any() and not raw[start + size :].any()  # nothing outside the target


def test_a_batch_hashes_only_what_it_is_asked_to() -> None:
    targets = [np.zeros(n, np.uint8) for n in (48, 70_000, 5, 20_000)]
    offsets = [0, 100, 70_200, 80_000]
    base = hashed_copy.address(SOURCE.data)
    digests = hashed_copy.copy([base + o for o in offsets], [t.data for t in targets],
                               [False, True, False, True])
    for t, o in zip(targets, offsets, strict=True):
        assert t.tobytes() == SOURCE[o : o + t.size].tobytes()
    assert digests == [None, xxhash.xxh3_64_intdigest(SOURCE[100:70_100].tobytes()), None,
                       xxhash.xxh3_64_intdigest(SOURCE[80_000:100_000].tobytes())]
    assert hashed_copy.copy([], [], []) == []


def _segment(tmp_path: Path, data: bytes) -> ShmTransport:
    path = tmp_path / "segment"
    path.write_bytes(data)
    return ShmTransport(str(path), os.path.getsize(path))


def test_shm_reads_return_the_digest_of_each_ops_last_view(tmp_path: Path) -> None:
    data = SOURCE[:300_000].tobytes()
    shm = _segment(tmp_path, data)
    heads = [bytearray(40), bytearray(24)]
    payloads = [bytearray(100_000), bytearray(50_001)]
    ops = [(1000, [memoryview(heads[0]), memoryview(payloads[0])]),
           (200_000, [memoryview(heads[1]), memoryview(payloads[1])])]
    assert shm.read_into(ops) == [xxhash.xxh3_64_intdigest(data[1040:101_040]),
                                  xxhash.xxh3_64_intdigest(data[200_024:250_025])]
    assert bytes(heads[0]) == data[1000:1040] and bytes(payloads[0]) == data[1040:101_040]
    assert bytes(heads[1]) == data[200_000:200_024]
    assert bytes(payloads[1]) == data[200_024:250_025]
    shm.close()


def test_shm_reads_without_the_hashed_copy_leave_the_hashing_to_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashed_copy, "available", lambda: False)
    data = SOURCE[:4096].tobytes()
    shm = _segment(tmp_path, data)
    out = bytearray(1000)
    landed: list[int] = []
    assert shm.read_into([(96, [memoryview(out)])], landed.append) is None
    assert bytes(out) == data[96:1096] and landed == [0]
    shm.close()


# ---- writes: each object hashed once, by whoever claims it first -------------------------


def test_a_pending_objects_payload_is_hashed_by_its_one_claimer() -> None:
    layout = BlockLayout.raw(5)
    digest = xxhash.xxh3_64_intdigest(b"hello")
    first = PendingObject("k", layout, b"hello")
    assert first.claim() and not first.claim()
    first.compute_checksum()  # claimed already: leaves it to the claimer
    first.give_up()  # likewise: the claimer finishes it
    first.set_checksum(digest)
    assert not isinstance(check_object(bytes(first.header()) + b"hello", "k", layout), Rejection)
    # Nobody hashed it: the taker of the header does.
    lazy = PendingObject("k", layout, b"hello")
    assert bytes(lazy.header()) == bytes(first.header())
    assert not lazy.claim()
    failed = PendingObject("k", layout, b"hello")
    assert failed.claim()
    failed.fail(OSError("copy failed"))
    with pytest.raises(OSError, match="copy failed"):
        failed.header()


def count_python_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the payloads python-xxhash hashes for the pool's objects from now on."""
    hashed: list[int] = []
    real = xxhash.xxh3_64_intdigest

    def counted(data: object) -> int:
        hashed.append(memoryview(data).nbytes)  # type: ignore[arg-type]
        return real(data)  # type: ignore[arg-type]

    monkeypatch.setattr(block_object.xxhash, "xxh3_64_intdigest", counted)
    return hashed


@pytest.mark.parametrize("count", [1, 6])  # one object: hashed as written; six: a put of 2 MB+
def test_shm_puts_hash_each_payload_once_as_they_copy_it(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory()  # on the node's host: shm
    hashed = count_python_hashing(monkeypatch)
    layout = BlockLayout("fp", "uint8", (400_000,))
    keys = [f"{i:032x}" for i in range(count)]
    data = [SOURCE[i * 1000 : i * 1000 + 400_000].tobytes() for i in range(count)]
    assert c.put_many(list(zip(keys, data, strict=True)), layout) == [True] * count
    assert hashed == []  # neither ahead in a thread nor by the header's taker
    buffers = [bytearray(400_000) for _ in keys]
    got = c.read_into(c.match_prefix(keys), buffers, layout)  # checked against the headers
    assert got.rejected == (None,) * count and [bytes(b) for b in buffers] == data


def test_puts_without_the_hashed_copy_hash_each_payload_once(
        node_factory: Callable[..., NodeServer], client_factory: Callable[..., KVStoreClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashed_copy, "available", lambda: False)
    node_factory("n", dram_bytes=16 * MIB)
    c = client_factory()
    hashed = count_python_hashing(monkeypatch)
    keys = [f"{i:032x}" for i in range(6)]
    assert c.put_many([(k, SOURCE[:400_000].tobytes()) for k in keys]) == [True] * 6
    assert hashed == [400_000] * 6
