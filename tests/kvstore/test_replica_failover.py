"""A read that fails on one replica reads another: a damaged copy (refused by the checksum) and
a SIGKILLed `kvstore node` process, read during the node-timeout window, before the master has
dropped the dead node (replicas=2, the client on a third host, over TCP)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kv_helpers import ProcessPool, two_node_pool, wait_for

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig
from kvstore.node_service import NodeServer
from pantry.common.config_flags import MIB

NODE_TIMEOUT_S = 6.0


@pytest.fixture
def master_config() -> MasterConfig:
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.1, lease_ms=500,
                        max_object_bytes=4 * MIB, replicas=2)


def _failovers(c: KVStoreClient) -> float:
    return c.metrics.registry.get_sample_value("pantry_kv_client_read_failovers_total") or 0.0


def test_a_damaged_replica_is_refused_and_the_other_one_read(
        node_factory: Callable[..., NodeServer],
        client_factory: Callable[..., KVStoreClient]) -> None:
    nodes = {n.node.config.node_id: n for n in (node_factory("fa", host_id="host-a"),
                                         node_factory("fb", host_id="host-b"))}
    c = client_factory(host_id="host-c")
    payload = os.urandom(3000)
    assert c.put_many([("dmg", payload)]) == [True]
    listed, _ = c.list_objects("dmg")
    assert sorted(o.location.node_id for o in listed) == sorted(nodes)
    # With no reads handed out yet, the first goes to the lowest node id: damage that copy.
    first = min(nodes)
    (loc,) = [o.location for o in listed if o.location.node_id == first]
    with open(nodes[first].node.segment.path, "r+b") as f:
        f.seek(loc.offset + loc.length - 1)
        last = f.read(1)
        f.seek(loc.offset + loc.length - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    assert c.get_many(["dmg"]) == [payload]
    samples = c.metrics.registry
    assert samples.get_sample_value("pantry_kv_client_objects_rejected_total",
                                    {"reason": "checksum"}) == 1.0
    assert _failovers(c) == 1.0
    # Into a caller's buffer the same way: each copy has been handed once, so the damaged one
    # (the lowest id) is handed first again, refused, and the other one read.
    buf = bytearray(len(payload))
    got = c.read_into(["dmg"], [buf])
    assert got.objects[0] is not None and bytes(buf) == payload
    assert got.rejected == (None,)
    assert samples.get_sample_value("pantry_kv_client_objects_rejected_total",
                                    {"reason": "checksum"}) == 2.0
    assert _failovers(c) == 2.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    """A master (replicas 2, node timeout 6 s) and two `kvstore node` processes."""
    with two_node_pool(tmp_path, "fo", node_timeout_s=NODE_TIMEOUT_S) as pool:
        yield pool


@pytest.mark.slow
def test_reads_succeed_inside_the_node_timeout_window_after_a_node_sigkill(
        pool: ProcessPool) -> None:
    address, ids, procs = pool
    with KVStoreClient(address, host_id="host-c", config=ClientConfig(rpc_timeout_s=2.0)) as c:
        wait_for(lambda: len(c.status().nodes) == 2, what="both nodes registered")
        objects = {f"fo/{i}": os.urandom(700 + 37 * i) for i in range(40)}
        keys = list(objects)
        assert c.put_many(list(objects.items())) == [True] * 40  # the pool's default: 2
        assert c.get_many(keys) == list(objects.values())  # connections to both are open
        match = c.match_prefix(keys)
        victim_id = ids[0]
        on_victim = sum(loc is not None and loc.node_id == victim_id
                        for loc in match.locations)
        assert 0 < on_victim < 40  # reads spread over both copies
        victim = procs[1 + ids.index(victim_id)]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()

        # The locations handed before the kill: each one on the dead node is read elsewhere.
        fetched = c.read(match)
        first_read_s = time.monotonic() - killed
        assert [bytes(o.payload) if o else None for o in fetched.objects] == list(
            objects.values())
        assert _failovers(c) == on_victim
        # Fresh lookups while the master still lists the dead node: every read succeeds.
        rounds = 0
        while time.monotonic() - killed < 2.0:
            assert c.get_many(keys) == list(objects.values())
            bufs = [bytearray(len(v)) for v in objects.values()]
            got = c.read_into(keys, bufs)
            assert [bytes(b) for b in bufs] == list(objects.values())
            assert got.objects.count(None) == 0
            rounds += 1
        status = c.status()
        assert time.monotonic() - killed < NODE_TIMEOUT_S
        assert victim_id in [n.node.node_id for n in status.nodes], "still inside the window"
        assert rounds >= 2 and _failovers(c) > on_victim
        print(f"\nfirst read after SIGKILL (40 keys, {on_victim} on the dead node): "
              f"{first_read_s * 1000:.1f} ms; {rounds} get+read_into rounds in 2 s, all hits")
