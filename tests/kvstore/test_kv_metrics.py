"""GET /metrics of a real master and node after known operations: exact values."""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import pytest
from kv_helpers import raw_size, sample, scrape, wait_for

from kvstore.client import KVStoreClient
from kvstore.config import MasterConfig
from kvstore.master import Master
from kvstore.master_service import MasterServer, start_master
from kvstore.metadata import NodeInfo
from kvstore.node_service import NodeServer
from pantry.common.config_flags import KIB, MIB
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

NodeFactory = Callable[..., NodeServer]
ClientFactory = Callable[..., KVStoreClient]
SIZE = 10_000


@pytest.fixture
def master_config() -> MasterConfig:
    # Leases that outlive the test, so the active-lease gauge is exact when scraped.
    return MasterConfig(port=0, node_timeout_s=5.0, reap_interval_s=0.1, lease_ms=60_000,
                        max_object_bytes=4 * MIB)


def test_master_metrics_after_puts_hit_miss_match_and_abort(
    master: MasterServer, master_address: str, node_factory: NodeFactory,
    client_factory: ClientFactory
) -> None:
    node_factory("n", dram_bytes=8 * MIB)
    c = client_factory(host_id="host-b")
    items = [(f"k{i}", bytes([i]) * SIZE) for i in range(3)]
    assert c.put_many(items) == [True] * 3
    assert c.get_many(["k0"]) == [items[0][1]]
    assert c.get_many(["missing"]) == [None]
    assert c.match_prefix(["k0", "k1", "nope", "k2"]).matched == 2
    with grpc.insecure_channel(master_address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        r = stub.PutStart(pb.PutStartRequest(keys=["dropped"], sizes=[10], client_host_id="x"))
        ticket = pb.PutTicket(key="dropped", token=r.slots[0].grant.token)
        assert stub.PutAbort(pb.PutFinishRequest(puts=[ticket])).aborted == 1

    m = scrape(master.metrics.url)
    # Slab slots: 10,000 bytes + a 64-byte header, rounded up to a 128-byte granule.
    gauges = {"objects": 3, "used_bytes": 3 * 10_112, "capacity_bytes": 8 * MIB,
              "nodes_alive": 1, "leases_active": 2}
    counters = {"hits": 1, "misses": 1, "evictions": 0, "puts_started": 4, "puts_sealed": 3,
                "puts_aborted": 1, "puts_expired": 0, "match_prefix_calls": 1,
                "blocks_matched": 2}
    assert {k: sample(m, f"pantry_kv_master_{k}") for k in gauges} == gauges
    # One class, one page of it: 1,044,480 bytes (1 MiB down to a 4 KiB boundary) of slots.
    slab = {k: sample(m, f"pantry_kv_master_slab_{k}", node=f"n-{os.getpid()}",
                      slot_bytes="10112")
            for k in ("pages", "slots", "used_slots")}
    assert slab == {"pages": 1, "slots": 1_044_480 // 10_112, "used_slots": 3}
    assert {k: sample(m, f"pantry_kv_master_{k}_total") for k in counters} == counters
    rpcs = {"PutStart": 2, "PutEnd": 1, "PutAbort": 1, "GetReplicas": 2, "MatchPrefix": 1,
            "Exists": 0, "Remove": 0, "List": 0}
    assert {k: sample(m, "pantry_kv_master_rpc_seconds_count", method=k) for k in rpcs} == rpcs


def test_node_metrics_count_bytes_and_requests_per_transport(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node = node_factory("n", dram_bytes=8 * MIB)
    tcp = client_factory(host_id="host-b")
    items = [(f"t{i}", os.urandom(SIZE)) for i in range(3)]
    assert tcp.put_many(items) == [True] * 3
    assert tcp.get_many(["t1", "missing"]) == [items[1][1], None]
    over_grpc = client_factory(host_id="host-b", enable_tcp=False)
    assert over_grpc.put_many([("g0", b"g" * 5000), ("g1", b"h" * 5000)]) == [True, True]
    assert over_grpc.get_many(["g0"]) == [b"g" * 5000]
    # A refused read is a request that moved nothing.
    with grpc.insecure_channel(node.address) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.KVNodeStub(ch).Read(pb.ReadRequest(ops=[pb.ReadOp(offset=8 * MIB, length=1)],
                                                   epoch=node.node.epoch))
    # Same host: the client copies through shared memory and the node sees nothing.
    assert client_factory(host_id="host-a").put_many([("s0", b"s" * 5000)]) == [True]

    m = scrape(node.metrics.url)
    assert sample(m, "pantry_kv_node_segment_capacity_bytes") == 8 * MIB
    moved = {(t, op): sample(m, f"pantry_kv_node_{op}_bytes_total", transport=t)
             for t in ("grpc", "tcp") for op in ("read", "written")}
    # Each object is its payload behind a header of 64 bytes (short keys, plain bytes).
    assert raw_size(SIZE, "t0") == SIZE + 64 and raw_size(5000, "g0") == 5064
    assert moved == {("grpc", "read"): 5064, ("grpc", "written"): 2 * 5064,
                     ("tcp", "read"): SIZE + 64, ("tcp", "written"): 3 * (SIZE + 64)}
    requests = {(t, op): sample(m, "pantry_kv_node_requests_total", transport=t, op=op)
                for t in ("grpc", "tcp") for op in ("read", "write")}
    assert requests == {("grpc", "read"): 2, ("grpc", "write"): 1,
                        ("tcp", "read"): 1, ("tcp", "write"): 1}


def test_abandoned_put_counts_as_expired() -> None:
    config = MasterConfig(port=0, put_timeout_s=0.2, reap_interval_s=0.05,
                          node_timeout_s=60.0)
    master = Master(config)
    # A node that never heartbeats: within node_timeout_s it is still a placement target.
    master.register_node(NodeInfo("quiet", "h", "127.0.0.1:1", "/dev/shm/none", 64 * KIB))
    srv = start_master(config, master)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            r = pb_grpc.KVMasterStub(ch).PutStart(
                pb.PutStartRequest(keys=["a", "b"], sizes=[10, 10], client_host_id="h"))
        assert [s.state for s in r.slots] == [pb.PUT_STATE_ALLOCATED] * 2
        wait_for(lambda: sample(scrape(srv.metrics.url),
                                "pantry_kv_master_puts_expired_total") == 2,
                 what="puts expired")
        m = scrape(srv.metrics.url)
        assert sample(m, "pantry_kv_master_puts_started_total") == 2
        assert sample(m, "pantry_kv_master_puts_sealed_total") == 0
        assert sample(m, "pantry_kv_master_objects") == 0
        assert sample(m, "pantry_kv_master_used_bytes") == 0
        assert sample(m, "pantry_kv_master_capacity_bytes") == 64 * KIB
    finally:
        srv.stop(grace=0)
