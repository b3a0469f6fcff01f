"""The SSD tier on its own: files, LRU and watermarks, checks on read, restart re-indexing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvstore.block_object import BlockLayout, encode_object
from kvstore.ssd_tier import Spill, SsdDirInUseError, SsdTier, file_name

PAYLOAD = 1000


def obj(key: str, fill: int = 7, n: int = PAYLOAD) -> bytes:
    return encode_object(key, BlockLayout.raw(n), bytes([fill]) * n)


SIZE = len(obj("k00"))  # every test key has 3 characters: every object is this long


def test_spill_then_read_into_a_callers_buffer(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), 10 * SIZE)
    data = obj("k00", fill=3)
    assert tier.spill("k00", data) is Spill.STORED
    assert tier.spill("k00", data) is Spill.EXISTS
    assert (tmp_path / "k00.pkv").read_bytes() == data
    buf = memoryview(bytearray(SIZE + 100))
    got = tier.read_into("k00", buf)
    assert got is not None and bytes(got) == data
    assert got.obj is buf.obj  # straight into the caller's buffer, no copy of its own
    assert tier.read_into("nope", buf) is None
    s = tier.stats()
    assert (s.objects, s.used_bytes, s.hits, s.misses) == (1, SIZE, 1, 1)
    assert s.spills["stored"] == 1 and s.spills["exists"] == 1
    tier.close()


def test_bytes_that_are_not_the_keys_object_are_not_stored(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), 10 * SIZE)
    assert tier.spill("k01", obj("k00")) is Spill.INVALID  # another key's object
    damaged = bytearray(obj("k01"))
    damaged[-1] ^= 0xFF
    assert tier.spill("k01", damaged) is Spill.INVALID
    assert os.listdir(tmp_path) == [".lock"]
    assert tier.stats().spills["invalid"] == 2
    tier.close()


def test_a_flipped_byte_is_a_miss_the_file_deleted_and_reported(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), 10 * SIZE)
    tier.spill("k00", obj("k00"))
    tier.spill("k01", obj("k01"))
    path = tmp_path / "k00.pkv"
    raw = bytearray(path.read_bytes())
    raw[SIZE - 10] ^= 0x01  # one payload bit
    path.write_bytes(raw)
    assert tier.read_into("k00") is None
    assert not path.exists()
    assert "k00" not in tier
    assert tier.drain_dropped() == ["k00"]
    assert tier.drain_dropped() == []
    s = tier.stats()
    assert (s.corrupted, s.objects, s.used_bytes, s.hits, s.misses) == (1, 1, SIZE, 0, 1)
    got = tier.read_into("k01")
    assert got is not None and bytes(got) == obj("k01")
    tier.close()


def test_watermark_eviction_order_is_exact_lru(tmp_path: Path) -> None:
    # high 0.8 of 10 objects: the 9th spill passes it, and LRU files go until <= 5 remain.
    tier = SsdTier(str(tmp_path), 10 * SIZE, high_watermark=0.8, low_watermark=0.5)
    for i in range(8):
        assert tier.spill(f"k{i:02d}", obj(f"k{i:02d}")) is Spill.STORED
    assert tier.drain_dropped() == []
    assert tier.read_into("k00") is not None  # k00 and k02 become most recently used
    assert tier.read_into("k02") is not None
    assert tier.spill("k08", obj("k08")) is Spill.STORED
    assert tier.drain_dropped() == ["k01", "k03", "k04", "k05"]
    assert [k for k, _ in tier.held()] == ["k06", "k07", "k00", "k02", "k08"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".lock"] + [file_name(k) for k in ("k00", "k02", "k06", "k07", "k08")])
    s = tier.stats()
    assert (s.evictions, s.used_bytes) == (4, 5 * SIZE)
    tier.close()


def test_a_full_tier_refuses_cleanly(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), SIZE - 1)
    assert tier.spill("k00", obj("k00")) is Spill.FULL
    assert os.listdir(tmp_path) == [".lock"]
    assert tier.stats().spills["full"] == 1 and tier.used_bytes == 0
    tier.close()


def test_keys_that_are_not_safe_file_names_are_hashed(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), 10 * len(obj("../x/..", n=10)))
    for key in ("../x/..", ".hidden", "a/b"):
        data = obj(key, n=10)
        assert tier.spill(key, data) is Spill.STORED
        name = file_name(key)
        assert name.startswith("~") and "/" not in name
        got = tier.read_into(key)
        assert got is not None and bytes(got) == data
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".lock"] + [file_name(k) for k in ("../x/..", ".hidden", "a/b")])
    assert not (tmp_path.parent / "x").exists()
    tier.close()


def test_restart_reindexes_from_headers_and_cleans_up(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), 10 * SIZE)
    for i in range(3):
        tier.spill(f"k{i:02d}", obj(f"k{i:02d}", fill=i))
    os.utime(tmp_path / "k00.pkv", (1, 1))  # the oldest: first to go
    tier.close()
    (tmp_path / ".tmp-99-0").write_bytes(obj("k09")[:100])  # a crash mid-spill
    (tmp_path / "k05.pkv").write_bytes(obj("k06"))  # a file under another key's name
    (tmp_path / "k07.pkv").write_bytes(obj("k07")[:-1])  # a truncated file
    again = SsdTier(str(tmp_path), 10 * SIZE)
    assert [k for k, _ in again.held()][0] == "k00"
    assert sorted(k for k, _ in again.held()) == ["k00", "k01", "k02"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "k00.pkv", "k01.pkv", "k02.pkv"]
    assert again.stats().corrupted == 2
    assert again.drain_dropped() == []
    got = again.read_into("k01")
    assert got is not None and bytes(got) == obj("k01", fill=1)
    again.close()


def test_one_node_per_directory(tmp_path: Path) -> None:
    tier = SsdTier(str(tmp_path), SIZE)
    with pytest.raises(SsdDirInUseError, match="in use by another node"):
        SsdTier(str(tmp_path), SIZE)
    tier.close()
    SsdTier(str(tmp_path), SIZE).close()


@pytest.mark.parametrize("fsync", [True, False])
def test_a_spill_is_flushed_file_then_directory_unless_told_not_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    flushed: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        flushed.append("dir" if stat.S_ISDIR(st.st_mode) else f"file of {st.st_size} B")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    tier = SsdTier(str(tmp_path), 10 * SIZE, fsync=fsync)
    assert tier.spill("k00", obj("k00")) is Spill.STORED
    assert flushed == ([f"file of {SIZE} B", "dir"] if fsync else [])
    tier.close()
