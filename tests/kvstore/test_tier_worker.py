"""The node's tiering worker on a real segment and SSD tier: spill, promote, drop, epochs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_helpers import wait_for

from kvstore.block_object import BlockLayout, encode_object
from kvstore.segment import Segment
from kvstore.ssd_tier import SsdTier
from kvstore.tier_worker import TierWorker
from kvstore.tiering import TierDone, TierOp, TierOrder


def obj(key: str, fill: int, n: int = 5000) -> bytes:
    return encode_object(key, BlockLayout.raw(n), bytes([fill]) * n)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Segment, SsdTier, TierWorker]]:
    seg = Segment(f"/dev/shm/pantry-test-tier-{os.getpid()}", 1 << 16, prefault=False)
    ssd = SsdTier(str(tmp_path / "ssd"), 1 << 20)
    worker = TierWorker(seg, ssd)
    worker.new_epoch(7)
    yield seg, ssd, worker
    worker.close()
    ssd.close()
    seg.close()


def report(worker: TierWorker, n: int) -> list[TierDone]:
    got: list[TierDone] = []

    def more() -> bool:
        got.extend(worker.take_report()[0])
        return len(got) >= n

    wait_for(more, timeout=5, what=f"{n} tier results")
    return got


def test_spill_promote_and_drop(rig: tuple[Segment, SsdTier, TierWorker]) -> None:
    seg, ssd, worker = rig
    data = obj("k1", 1)
    seg.write(0, data)
    worker.submit(7, [TierOrder(TierOp.SPILL, "k1", 0, len(data), token=11)])
    assert report(worker, 1) == [TierDone(TierOp.SPILL, "k1", 11, True, len(data))]
    assert Path(ssd.path("k1")).read_bytes() == data
    # Promotion: file -> another (pending) slot, checked there.
    worker.submit(7, [TierOrder(TierOp.PROMOTE, "k1", 8192, len(data), token=12)])
    assert report(worker, 1) == [TierDone(TierOp.PROMOTE, "k1", 12, True, len(data))]
    assert seg.read(8192, len(data)) == data
    worker.submit(7, [TierOrder(TierOp.DROP, "k1")])
    wait_for(lambda: "k1" not in ssd, timeout=5, what="drop")
    assert worker.take_report() == ([], ["k1"])
    assert not os.path.exists(ssd.path("k1"))


def test_a_reused_slot_is_not_spilled_and_a_missing_file_not_promoted(
        rig: tuple[Segment, SsdTier, TierWorker]) -> None:
    seg, ssd, worker = rig
    data = obj("k2", 2)
    seg.write(0, data)  # the slot now holds k2: the order for k1 is stale
    worker.submit(7, [TierOrder(TierOp.SPILL, "k1", 0, len(data), token=1),
                      TierOrder(TierOp.PROMOTE, "k3", 8192, len(data), token=2)])
    assert report(worker, 2) == [TierDone(TierOp.SPILL, "k1", 1, False, len(data)),
                                 TierDone(TierOp.PROMOTE, "k3", 2, False, len(data))]
    assert ssd.held() == []
    assert ssd.stats().spills["invalid"] == 1


def test_orders_of_an_old_epoch_are_skipped(rig: tuple[Segment, SsdTier, TierWorker]) -> None:
    seg, ssd, worker = rig
    data = obj("k1", 1)
    seg.write(0, data)
    worker.submit(6, [TierOrder(TierOp.SPILL, "k1", 0, len(data), token=1)])
    worker.submit(7, [TierOrder(TierOp.SPILL, "k1", 0, len(data), token=2)])
    assert report(worker, 1) == [TierDone(TierOp.SPILL, "k1", 2, True, len(data))]
    assert worker.take_report() == ([], [])


def test_undelivered_reports_are_given_back(rig: tuple[Segment, SsdTier, TierWorker]) -> None:
    seg, ssd, worker = rig
    data = obj("k1", 1)
    seg.write(0, data)
    worker.submit(7, [TierOrder(TierOp.SPILL, "k1", 0, len(data), token=5)])
    done = report(worker, 1)
    ssd.remove("k1")
    dropped = worker.take_report()[1]
    assert dropped == ["k1"]
    worker.give_back(done, dropped)  # the heartbeat carrying them failed
    assert worker.take_report() == (done, ["k1"])
