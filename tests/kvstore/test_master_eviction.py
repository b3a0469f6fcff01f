"""The master evicts with the policy of `--eviction`: exact victims under lru and reuse, with
the hints a prefix match gives the blocks it missed (the puts that follow touch them)."""

from __future__ import annotations

import argparse

import pytest
from kv_helpers import Clock

from kvstore.config import KIB, MasterConfig
from kvstore.master import Master, PutOutcome
from kvstore.metadata import NodeInfo
from pantry.common.config_flags import add_config_flags, config_from_args
from pantry.common.errors import ConfigError


def make_master(eviction: str) -> tuple[Master, Clock]:
    """One node with room for four 4 KiB objects; no watermark eviction."""
    clock = Clock()
    conf = MasterConfig(lease_ms=1000, high_watermark=1.0, low_watermark=1.0,
                        max_object_bytes=32 * KIB, eviction=eviction)
    m = Master(conf, clock=clock)
    m.register_node(NodeInfo("n1", "h1", "127.0.0.1:1", "/dev/shm/x", 16 * KIB))
    return m, clock


def put(m: Master, key: str) -> int:
    (grant,) = m.put_start([key], [4 * KIB], "h1")
    assert grant.outcome is PutOutcome.ALLOCATED and grant.location is not None, grant
    assert m.put_end([(key, grant.location.token)]) == [True]
    return grant.location.offset


def fill(m: Master) -> None:
    """A prompt of three blocks (missed by a prefix match, then put), then a loose block."""
    assert m.match_prefix(["root", "mid", "tail"]) == []
    assert [put(m, k) for k in ("root", "mid", "tail", "loose")] == [0, 4 * KIB, 8 * KIB,
                                                                     12 * KIB]


def test_lru_evicts_the_least_recently_used() -> None:
    m, _ = make_master("lru")
    fill(m)
    assert put(m, "y") == 0  # root, put first
    assert put(m, "z") == 4 * KIB  # then mid
    assert m.exists(["root", "mid", "tail", "loose", "y", "z"]) == [False, False, True, True,
                                                                     True, True]


def test_reuse_evicts_the_class_least_likely_to_be_read_again() -> None:
    m, _ = make_master("reuse")
    fill(m)
    # Classes as the policy saw them: root 'first', tail 'last', mid and loose (no hint: a
    # middle block) seen once. Nothing read again yet, so p = 1 / (touches + 2): the
    # seen-once class (2 touches, p = 1/4) goes before first and last (p = 1/3), oldest first.
    assert put(m, "y") == 4 * KIB  # mid
    assert put(m, "z") == 12 * KIB  # loose (y joined the class: p = 1/5)
    assert m.exists(["root", "mid", "tail", "loose", "y", "z"]) == [True, False, True, False,
                                                                     True, True]


def test_reuse_skips_a_leased_victim_and_evict_follows_its_order() -> None:
    m, clock = make_master("reuse")
    fill(m)
    # A prefix match of [root, mid] leases both and touches them: root as a 'first' block,
    # mid as that prompt's 'last'. Both classes were read again once of two touches (p = 1/2)
    # but 'last' (tail, then mid) only now: p = 1/4. Scores p(1 - F)/(1 - pF), F the learned
    # reuse-gap CDF at each block's age, order them: tail, mid, loose, root.
    assert len(m.match_prefix(["root", "mid"])) == 2
    assert list(m._nodes["n1"].eviction_order()) == ["tail", "mid", "loose", "root"]
    assert put(m, "y") == 8 * KIB  # tail
    # y joins the seen-once class (p = 2/5): mid (p = 1/4) is next, but leased: loose goes.
    assert put(m, "z") == 12 * KIB
    clock.t += 2  # the leases ran out: mid is first again
    assert m.evict(nbytes=4 * KIB) == (1, 4 * KIB)
    assert m.exists(["root", "mid", "tail", "loose", "y", "z"]) == [True, False, False, False,
                                                                     True, True]


def test_eviction_flag_and_validation() -> None:
    p = argparse.ArgumentParser()
    add_config_flags(p, MasterConfig)
    assert config_from_args(MasterConfig, p.parse_args(["--eviction", "reuse"])).eviction == \
        "reuse"
    assert MasterConfig().eviction == "lru"
    with pytest.raises(ConfigError, match="eviction must be one of lru, reuse, got 'fifo'"):
        MasterConfig(eviction="fifo")
