"""`kvstore evict --bytes N | --prefix P | --all` against a real master and node."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from kv_helpers import ROOT

from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.node_service import NodeServer
from pantry.common.config_flags import MIB

KEYS = ["a1", "a2", "b1", "b2", "b3", "c"]


@pytest.fixture
def master_config() -> MasterConfig:
    # Leases outlast the test: a leased slot is seen still taken, whatever the machine's pace.
    return MasterConfig(port=0, node_timeout_s=5.0, reap_interval_s=0.1, lease_ms=60_000,
                        max_object_bytes=4 * MIB)


def test_evict_by_bytes_prefix_and_all(node_factory: Callable[..., NodeServer],
                                       client_factory: Callable[..., KVStoreClient],
                                       master_address: str) -> None:
    node_factory("n")
    c = client_factory()
    assert c.put_many([(k, k.encode() * 1000) for k in KEYS]) == [True] * 6  # a 4 KiB slot each
    assert c.get_many(["a1"]) == [b"a1" * 1000]  # a1 is now the most recently used, and leased
    # The least recently used first, until the bytes asked for are freed.
    assert c.evict(nbytes=5000) == (2, 8192)
    assert c.exists(KEYS) == [True, False, False, True, True, True]
    assert c.evict(prefix="b") == (2, 8192)
    assert c.exists(KEYS) == [True, False, False, False, False, True]
    with pytest.raises(grpc.RpcError) as e:
        c.evict()
    assert isinstance(e.value, grpc.Call)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                   "name exactly one of bytes, prefix and all")
    out = subprocess.run([sys.executable, "-m", "kvstore", "evict", "--master", master_address,
                          "--all"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "evicted 2 objects (8.0 KiB)\n", "")
    status = c.status()
    assert (status.objects, status.evictions) == (0, 6)
    # a1's reader holds a lease: its slot stays taken until the lease runs out.
    assert status.used_bytes == 4096
