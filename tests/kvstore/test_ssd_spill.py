"""The SSD tier end to end on real servers: a master, nodes with --ssd-dir, real clients.

Spill off the request path (heartbeat orders), reads from SSD once DRAM dropped the object (a
same-host client reads the file, another host goes through the node), promotion back to DRAM,
restart re-indexing, a damaged file, a full tier.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from kv_helpers import free_port, sample, scrape, spawn, wait_for, wait_registered

from kvstore.block_object import Rejection
from kvstore.cli import build_parser
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.master_service import MasterServer
from kvstore.metadata import DRAM, SSD
from kvstore.node_service import NodeServer, start_node
from kvstore.ssd_tier import file_name
from pantry.common.config_flags import MIB

N = 4
PAYLOAD = 100_000


@pytest.fixture
def master_config() -> MasterConfig:
    # Spill as soon as anything is stored; promote on the second SSD read.
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.1, lease_ms=500,
                        max_object_bytes=4 * MIB, spill_watermark=0.001, promote_after_hits=2)


NodeFactory = Callable[..., NodeServer]


@pytest.fixture
def ssd_node(master_address: str, tmp_path: Path) -> Iterator[NodeFactory]:
    nodes: list[NodeServer] = []

    def make(ssd_bytes: int = 16 * MIB, node_id: str = "ssd") -> NodeServer:
        cfg = NodeConfig(master_address=master_address, node_id=f"{node_id}-{os.getpid()}",
                         dram_bytes=8 * MIB, host_id="host-a", heartbeat_s=0.1,
                         max_object_bytes=4 * MIB, ssd_dir=str(tmp_path / "ssd"),
                         ssd_bytes=ssd_bytes)
        srv = start_node(cfg)
        nodes.append(srv)
        wait_registered(master_address, srv)
        return srv

    yield make
    for srv in nodes:
        srv.stop(grace=0)


def payload(i: int) -> bytes:
    return bytes([i % 251]) * (PAYLOAD // 2) + os.urandom(PAYLOAD // 2)


def ssd_objects(c: KVStoreClient) -> int:
    return sum(n.ssd_objects for n in c.status().nodes)


def tiers(c: KVStoreClient, key: str) -> list[str]:
    return sorted(o.location.tier for o in c.list_objects(key)[0] if o.sealed)


def stored_and_spilled(c: KVStoreClient) -> dict[str, bytes]:
    items = {f"obj-{i}": payload(i) for i in range(N)}
    assert c.put_many(list(items.items())) == [True] * N
    wait_for(lambda: ssd_objects(c) == N, what="every object spilled")
    return items


def test_spill_then_read_from_ssd_after_dram_eviction(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient]) -> None:
    node = ssd_node()
    local, remote = client_factory("host-a"), client_factory("host-b")
    items = stored_and_spilled(local)
    assert sorted(k for k, _ in node.node.ssd.held()) == sorted(items)  # type: ignore[union-attr]
    evicted, _ = local.evict(nbytes=1 << 40)
    assert evicted == N
    assert all(tiers(local, k) == [SSD] for k in items)
    keys = list(items)
    # Same host: straight from the node's files. Another host: through the node's TCP server.
    assert local.get_many(keys) == [items[k] for k in keys]
    assert remote.get_many(keys[:2]) == [items[k] for k in keys[:2]]
    buf = bytearray(PAYLOAD)
    got = local.read_into([keys[3]], [buf])
    assert got.objects[0] is not None and bytes(buf) == items[keys[3]]
    # Only the remote client's read went through the node (one request), none of the local.
    m = scrape(node.metrics.url)
    assert sample(m, "pantry_kv_node_requests_total", transport="tcp", op="read") == 1
    assert sample(m, "pantry_kv_node_read_bytes_total", transport="tcp") == 2 * (
        PAYLOAD + 64)  # and each object's 64-byte header
    assert sample(m, "pantry_kv_node_ssd_corrupted_total") == 0


def test_remote_ssd_reads_go_over_tcp_straight_into_buffers_and_grpc_without_it(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient],
        master_address: str) -> None:
    node = ssd_node()
    local = client_factory("host-a")
    items = stored_and_spilled(local)
    local.evict(nbytes=1 << 40)
    keys = list(items)
    remote = client_factory("host-b")
    bufs = [bytearray(PAYLOAD) for _ in keys]
    got = remote.read_into(keys, bufs)
    assert [o is not None for o in got.objects] == [True] * N
    assert [bytes(b) for b in bufs] == [items[k] for k in keys]
    assert got.nbytes == N * (PAYLOAD + 64)
    m = scrape(node.metrics.url)
    # Every object of the call in one request.
    assert sample(m, "pantry_kv_node_requests_total", transport="tcp", op="read") == 1
    # A client without tcp reads them through the node's gRPC Read, the same bytes, in
    # messages of at most its batch_bytes: two objects each here.
    with KVStoreClient(master_address, host_id="host-c",
                       config=ClientConfig(enable_tcp=False, batch_bytes=250_000)) as plain:
        assert plain.get_many(keys) == [items[k] for k in keys]
    m = scrape(node.metrics.url)
    assert sample(m, "pantry_kv_node_requests_total", transport="grpc", op="read") == 2
    assert sample(m, "pantry_kv_node_requests_total", transport="tcp", op="read") == 1


def test_status_shows_both_tiers(ssd_node: NodeFactory, master_address: str,
                                 client_factory: Callable[..., KVStoreClient],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    node = ssd_node()
    c = client_factory("host-a")
    stored_and_spilled(c)
    c.evict(nbytes=1 << 40)
    ns = build_parser().parse_args(["status", "--master", master_address])
    assert ns.fn(ns) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()),
                     strict=True))
    used = sum(n for _, n in node.node.ssd.held())  # type: ignore[union-attr]
    assert (cells["USED"], cells["OBJECTS"]) == ("0 B", "0")
    assert (cells["SSD CAPACITY"], cells["SSD USED"], cells["SSD OBJECTS"]) == (
        "16.0 MiB", f"{used / 1024:.1f} KiB", str(N))


def test_an_ssd_object_read_twice_is_promoted_back_to_dram(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient],
        master: MasterServer) -> None:
    ssd_node()
    c = client_factory("host-a")
    items = stored_and_spilled(c)
    c.evict(nbytes=1 << 40)
    assert c.status().nodes[0].used_bytes == 0
    assert c.get_many(["obj-1"]) == [items["obj-1"]]
    assert c.get_many(["obj-1", "obj-2"]) == [items["obj-1"], items["obj-2"]]
    wait_for(lambda: tiers(c, "obj-1") == [DRAM, SSD], what="obj-1 promoted")
    m = scrape(master.metrics.url)
    assert sample(m, "pantry_kv_master_tier_moves_total", kind="spilled") == N
    assert sample(m, "pantry_kv_master_tier_moves_total", kind="promoted") == 1
    assert tiers(c, "obj-2") == [SSD]  # read once only
    m = c.match_prefix(["obj-1"])
    assert m.matched == 1 and m.locations[0].tier == DRAM
    assert c.get_many(["obj-1"]) == [items["obj-1"]]


def test_a_restarted_node_reindexes_its_ssd_dir(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient]) -> None:
    first = ssd_node()
    c = client_factory("host-b")  # through the node: its index must know the files
    items = stored_and_spilled(c)
    first.stop(grace=0)
    second = ssd_node()  # same id, same --ssd-dir, a fresh DRAM segment
    assert second.node.adopted == N
    keys = list(items)
    assert all(tiers(c, k) == [SSD] for k in keys)
    assert c.get_many(keys) == [items[k] for k in keys]
    assert c.status().nodes[0].ssd_objects == N


def test_a_damaged_file_is_a_miss_never_returned(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient],
        tmp_path: Path) -> None:
    node = ssd_node()
    local, remote = client_factory("host-a"), client_factory("host-b")
    items = stored_and_spilled(local)
    local.evict(nbytes=1 << 40)
    paths = [tmp_path / "ssd" / file_name(k) for k in ("obj-0", "obj-1")]
    for path in paths:  # one bit of each payload
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x01
        path.write_bytes(raw)
    # Each key is read once only: no promotion reads the damaged files meanwhile.
    assert local.get_many(["obj-0"]) == [None]  # checked by the client: refused
    assert paths[0].exists()  # the client cannot tell the node; its next reader will
    assert local.metrics.registry.get_sample_value(
        "pantry_kv_client_objects_rejected_total", {"reason": "checksum"}) == 1
    assert remote.get_many(["obj-1", "obj-2"]) == [None, items["obj-2"]]
    assert not paths[1].exists()  # the node deleted it and tells the master
    m = scrape(node.metrics.url)
    assert sample(m, "pantry_kv_node_ssd_corrupted_total") == 1
    assert sample(m, "pantry_kv_node_ssd_hits_total") == 1
    assert sample(m, "pantry_kv_node_ssd_objects") == N - 1
    wait_for(lambda: not local.exists(["obj-1"])[0], what="the master forgot obj-1")
    assert local.status().nodes[0].ssd_objects == N - 1


def test_a_full_ssd_refuses_spills_and_nothing_breaks(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient]) -> None:
    node = ssd_node(ssd_bytes=PAYLOAD // 2)  # smaller than any object
    c = client_factory("host-a")
    items = {f"obj-{i}": payload(i) for i in range(N)}
    assert c.put_many(list(items.items())) == [True] * N
    ssd = node.node.ssd
    assert ssd is not None
    wait_for(lambda: ssd.stats().spills["full"] == N, what="every spill refused")
    assert ssd.held() == [] and os.listdir(ssd.directory) == [".lock"]
    assert ssd_objects(c) == 0
    assert c.get_many(list(items)) == list(items.values())
    # A small object still fits; the refused ones are not asked for again.
    assert c.put_many([("more", b"x" * 10)]) == [True]
    wait_for(lambda: ssd_objects(c) == 1, what="the small object spilled")
    assert [k for k, _ in ssd.held()] == ["more"]
    m = scrape(node.metrics.url)
    assert sample(m, "pantry_kv_node_ssd_spills_total", outcome="full") == N
    assert sample(m, "pantry_kv_node_ssd_spills_total", outcome="stored") == 1


@pytest.mark.slow
def test_sigkilled_master_and_node_serve_ssd_objects_again(tmp_path: Path) -> None:
    """Real processes: both SIGKILLed, restarted on the same --ssd-dir with a memory master that
    knows nothing; the node re-indexes its files and the master adopts them."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    ssd_dir = tmp_path / "ssd"
    master_args = ("master", "--port", str(port), "--reap-interval", "0.1",
                   "--spill-watermark", "0.001")
    node_args = ("node", "--master", address, "--node-id", f"ssdkill-{os.getpid()}",
                 "--dram-bytes", "16MiB", "--heartbeat", "0.1", "--host-id", "host-a",
                 "--no-prefault", "--ssd-dir", str(ssd_dir), "--ssd-bytes", "64MiB")
    procs = [spawn(tmp_path, "master", *master_args)[0], spawn(tmp_path, "node", *node_args)[0]]
    client = KVStoreClient(address, host_id="host-b", config=ClientConfig(rpc_timeout_s=2.0))
    try:
        wait_for(lambda: len(client.status().nodes) == 1, what="node registered")
        items = stored_and_spilled(client)
        client.evict(nbytes=1 << 40)  # DRAM copies gone: only the files hold them
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        (ssd_dir / ".tmp-1-1").write_bytes(b"half an object")  # as a crash mid-spill leaves
        procs = [spawn(tmp_path, "master2", *master_args)[0],
                 spawn(tmp_path, "node2", *node_args)[0]]

        def served() -> bool:
            try:
                return client.get_many(list(items)) == list(items.values())
            except grpc.RpcError:
                return False

        wait_for(served, what="every SSD object served again")
        assert sorted(os.listdir(ssd_dir)) == sorted([".lock"] + [file_name(k) for k in items])
        assert [(n.objects, n.ssd_objects) for n in client.status().nodes] == [(0, N)]
    finally:
        client.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)


def test_ssd_files_read_into_buffers_are_checked_as_they_land(
        ssd_node: NodeFactory, client_factory: Callable[..., KVStoreClient],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvstore.reader.OVERLAP_CHECK_BYTES", 1)  # every read overlaps
    ssd_node()
    local = client_factory("host-a")
    items = stored_and_spilled(local)
    local.evict(nbytes=1 << 40)
    path = tmp_path / "ssd" / file_name("obj-1")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01
    path.write_bytes(raw)
    keys = list(items)
    bufs = [bytearray(PAYLOAD) for _ in keys]
    got = local.read_into(keys, bufs)
    assert [o is not None for o in got.objects] == [True, False, True, True]
    assert got.rejected[1] is Rejection.CHECKSUM
    assert [bytes(b) for i, b in enumerate(bufs) if i != 1] == [
        items[k] for i, k in enumerate(keys) if i != 1]
