"""The service token on every kvstore RPC: the master's and the node's gRPC services and the
bulk TCP transport refuse a call without it, or with another, UNAUTHENTICATED, revealing
nothing; clients that hold it (explicitly, from $PANTRY_TOKEN_FILE, or `--token-file` on the
CLI) work as before."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kv_helpers import ROOT, wait_for

from kvstore.auth import TOKEN_FILE_ENV, UNAUTHENTICATED, load_token
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.master_service import MasterServer, start_master
from kvstore.node_service import NodeServer, start_node
from kvstore.transports import TransportError
from kvstore.transports.grpc import GrpcTransport
from kvstore.transports.tcp import TcpTransport
from pantry.common.config_flags import MIB
from pantry.common.errors import ConfigError
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-of-this-run"


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def pool(token_file: str) -> Iterator[tuple[MasterServer, NodeServer, str]]:
    master = start_master(MasterConfig(token_file=token_file))
    address = f"127.0.0.1:{master.port}"
    node = start_node(NodeConfig(master_address=address, node_id="tok-node", dram_bytes=4 * MIB,
                                 host_id="host-a", heartbeat_s=0.2, token_file=token_file,
                                 prefault=False))
    # The node registered: it holds the token too.
    wait_for(lambda: node.node.epoch != 0 and master.master.status().nodes[0].node.epoch
             == node.node.epoch, what="node registered with its token")
    yield master, node, address
    node.stop(grace=0)
    master.stop(grace=0)


def refusal(call: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    assert isinstance(call, grpc.Call)
    return call.code(), call.details()


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
def test_a_client_with_the_token_works_on_every_transport(
    pool: tuple[MasterServer, NodeServer, str], transport: str
) -> None:
    _, node, address = pool
    host = "host-a" if transport == "shm" else "host-b"
    cfg = ClientConfig(enable_tcp=transport == "tcp")
    with KVStoreClient(address, host_id=host, config=cfg, token=TOKEN) as c:
        assert c.put_many([("k", b"v" * 5000)]) == [True]
        assert c.get_many(["k"]) == [b"v" * 5000]
        assert c.transport_name(c.status().nodes[0].node) == transport


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_without_the_token_every_rpc_is_unauthenticated(
    pool: tuple[MasterServer, NodeServer, str], token: str
) -> None:
    master, node, address = pool
    with KVStoreClient(address, host_id="host-a", token=TOKEN) as good:
        assert good.put_many([("k", b"v" * 100)]) == [True]
        (loc,) = good.match_prefix(["k"]).locations
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.KVMasterStub(ch)
        metadata = [("pantry-token", token)] if token else []
        calls = [
            lambda: stub.Status(pb.StatusRequest(), metadata=metadata),
            lambda: stub.List(pb.ListRequest(), metadata=metadata),
            lambda: stub.GetReplicas(pb.KeysRequest(keys=["k"]), metadata=metadata),
            lambda: stub.PutStart(pb.PutStartRequest(keys=["x"], sizes=[10]),
                                  metadata=metadata),
            lambda: stub.Remove(pb.KeysRequest(keys=["k"]), metadata=metadata),
            # A fake node with the real one's id: before, this wiped its objects.
            lambda: stub.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
                node_id="tok-node", address="127.0.0.1:1")), metadata=metadata),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert refusal(e.value) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
    # The node's own services, gRPC and TCP, refuse the same way.
    grpc_t = GrpcTransport(node.node.address, 8 * MIB, 8 * MIB, 5.0, node.node.epoch, token)
    tcp_t = TcpTransport(node.node.tcp_address, 5.0, node.node.epoch, token=token)
    try:
        with pytest.raises(TransportError) as ge:
            grpc_t.read([(loc.offset, loc.length)])
        assert str(ge.value) == f"grpc read failed: StatusCode.UNAUTHENTICATED: {UNAUTHENTICATED}"
        with pytest.raises(TransportError) as te:
            tcp_t.read([(loc.offset, loc.length)])
        assert str(te.value) == f"node refused: {UNAUTHENTICATED}"
    finally:
        grpc_t.close()
        tcp_t.close()
    # Nothing was harmed: the object and the node are as they were.
    status = master.master.status()
    assert (status.objects, [n.node.epoch for n in status.nodes]) == (1, [node.node.epoch])
    with KVStoreClient(address, host_id="host-b", token=TOKEN) as good:
        assert good.get_many(["k"]) == [b"v" * 100]


def test_clients_read_the_token_file_from_the_environment(
    pool: tuple[MasterServer, NodeServer, str], token_file: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, address = pool
    monkeypatch.setenv(TOKEN_FILE_ENV, token_file)
    with KVStoreClient(address, host_id="host-b") as c:
        assert c.put_many([("env", b"1" * 10)]) == [True]
    monkeypatch.delenv(TOKEN_FILE_ENV)
    with KVStoreClient(address, host_id="host-b") as c, pytest.raises(grpc.RpcError) as e:
        c.exists(["env"])
    assert refusal(e.value) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


def test_the_cli_takes_a_token_file(pool: tuple[MasterServer, NodeServer, str],
                                    token_file: str) -> None:
    _, _, address = pool

    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvstore", *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})

    ok = kv("status", "--master", address, "--token-file", token_file)
    assert (ok.returncode, ok.stderr) == (0, "")
    assert "tok-node" in ok.stdout
    refused = kv("status", "--master", address)
    assert (refused.returncode, refused.stdout) == (3, "")
    assert refused.stderr == (f"kvstore: rpc failed: StatusCode.UNAUTHENTICATED: "
                              f"{UNAUTHENTICATED}\n")


def test_token_files_are_checked(tmp_path: Path) -> None:
    assert load_token(None) == ""
    (tmp_path / "empty").write_text("\n")
    for name in ("missing", "empty"):
        with pytest.raises(ConfigError, match=f"^token_file: .*{name}"):
            load_token(str(tmp_path / name))
