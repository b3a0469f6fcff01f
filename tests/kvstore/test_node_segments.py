"""A node's segment across restarts: leftovers of a dead node of the same id (or of our own
pid, as a container restart gives) are removed at start instead of making the node exit, and
a node that registers again reports the intact objects its segment holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvstore.block_object import BlockLayout, encode_object
from kvstore.config import NodeConfig
from kvstore.node import remove_stale_segments
from kvstore.node_service import start_node
from kvstore.segment import Segment
from pantry.common.config_flags import KIB, MIB


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_segments_of_dead_or_own_pids_are_removed(tmp_path: Path) -> None:
    cfg = NodeConfig(master_address="127.0.0.1:1", node_id="n-1", shm_dir=str(tmp_path))
    own = tmp_path / f"pantry-kv-n-1-{os.getpid()}"
    dead = tmp_path / f"pantry-kv-n-1-{_dead_pid()}"
    alive = tmp_path / f"pantry-kv-n-1-{os.getppid()}"  # a live node of this id: not ours
    other = tmp_path / f"pantry-kv-n-1-x-{_dead_pid()}"  # node "n-1-x": not this node
    odd = tmp_path / "pantry-kv-n-1-notapid"
    for f in (own, dead, alive, other, odd):
        f.write_bytes(b"old")
    assert sorted(remove_stale_segments(cfg)) == sorted([str(own), str(dead)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other.name, odd.name])


@pytest.mark.slow
def test_a_node_restarted_with_its_own_pid_starts(tmp_path: Path) -> None:
    # Before: O_EXCL on the leftover file made the node exit, and the container crash-looped.
    cfg = NodeConfig(master_address="127.0.0.1:1", node_id="again", shm_dir=str(tmp_path),
                     dram_bytes=1 * MIB, prefault=False)
    (tmp_path / f"pantry-kv-again-{os.getpid()}").write_bytes(b"left by the last run")
    srv = start_node(cfg)
    try:
        assert os.path.getsize(srv.node.segment.path) == 1 * MIB
    finally:
        srv.stop(grace=0)
    assert list(tmp_path.iterdir()) == []


def test_a_segment_reports_the_intact_objects_it_holds(tmp_path: Path) -> None:
    seg = Segment(str(tmp_path / "seg"), 64 * KIB, prefault=False)
    try:
        a = encode_object("a", BlockLayout.raw(100), b"1" * 100)
        b = encode_object("b", BlockLayout("fp", "float16", (2, 8)), b"2" * 32)
        torn = bytearray(encode_object("torn", BlockLayout.raw(900), b"3" * 900))
        torn[-1] ^= 0xFF  # its writer died mid-write: the checksum fails
        seg.write(0, a)
        seg.write(8 * KIB, b)
        seg.write(16 * KIB, bytes(torn))
        # The magic at an unaligned offset inside a payload is not an object.
        seg.write(32 * KIB, encode_object("c", BlockLayout.raw(200), b"x" + a[:64] + b"y" * 135))
        held = seg.objects()
        assert [(h.key, h.offset, h.length) for h in held] == [
            ("a", 0, len(a)), ("b", 8 * KIB, len(b)), ("c", 32 * KIB, 64 + 200)]
    finally:
        seg.close()


@pytest.mark.parametrize("prefault", [True, False])
def test_a_prefaulted_segment_has_every_page_allocated_at_start(prefault: bool) -> None:
    path = f"/dev/shm/pantry-test-prefault-{os.getpid()}-{prefault}"
    seg = Segment(path, 4 * MIB, prefault=prefault)
    try:
        assert os.stat(path).st_blocks * 512 == (4 * MIB if prefault else 0)
    finally:
        seg.close()
    assert not os.path.exists(path)
