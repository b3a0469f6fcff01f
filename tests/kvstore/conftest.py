"""Shared fixtures: real master and node gRPC servers on 127.0.0.1, port 0."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kv_helpers import RedisServer, wait_registered

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.master_service import MasterServer, start_master
from kvstore.node_service import NodeServer, start_node
from pantry.common.config_flags import MIB


@pytest.fixture
def master_config() -> MasterConfig:
    return MasterConfig(port=0, node_timeout_s=2.0, reap_interval_s=0.1, lease_ms=500,
                        max_object_bytes=4 * MIB)


@pytest.fixture
def master(master_config: MasterConfig) -> Iterator[MasterServer]:
    srv = start_master(master_config)
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def master_address(master: MasterServer) -> str:
    return f"127.0.0.1:{master.port}"


@pytest.fixture
def node_factory(master_address: str) -> Iterator[Callable[..., NodeServer]]:
    nodes: list[NodeServer] = []

    def make(node_id: str, dram_bytes: int = 8 * MIB, host_id: str = "host-a",
             wait: bool = True) -> NodeServer:
        cfg = NodeConfig(master_address=master_address, node_id=f"{node_id}-{os.getpid()}",
                         dram_bytes=dram_bytes, host_id=host_id, heartbeat_s=0.2,
                         max_object_bytes=4 * MIB)
        srv = start_node(cfg)
        nodes.append(srv)
        if wait:
            wait_registered(master_address, srv)
        return srv

    yield make
    for srv in nodes:
        srv.stop(grace=0)
        assert not os.path.exists(srv.node.segment.path), "segment left in /dev/shm"


@pytest.fixture
def client_factory(master_address: str) -> Iterator[Callable[..., KVStoreClient]]:
    clients: list[KVStoreClient] = []

    def make(host_id: str = "host-a", **cfg: object) -> KVStoreClient:
        c = KVStoreClient(master_address, host_id=host_id,
                          config=ClientConfig(max_object_bytes=4 * MIB, rpc_timeout_s=5.0,
                                              **cfg))  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty database of the module's redis-server."""
    url = redis_server.url(1)
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    return url
