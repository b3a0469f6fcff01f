"""A SIGKILLed master, restarted on the same port, serves every sealed object again: from its
records in a real redis-server, or (memory backend) from what the nodes report they hold when
they register again. Puts pending at the crash are reclaimed. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from kv_helpers import free_port, shm_files, spawn, wait_for

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=20)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_sigkilled_master_serves_every_sealed_object_again(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    metadata = request.getfixturevalue("redis_url") if backend == "redis" else "memory"
    port = free_port()
    address = f"127.0.0.1:{port}"
    master_args = ("master", "--port", str(port), "--metadata", metadata, "--reap-interval",
                   "0.1", "--node-timeout", "5")
    master, _ = spawn(tmp_path, "master", *master_args)
    node_id = f"rec-{backend}-{os.getpid()}"
    node, _ = spawn(tmp_path, "node", "node", "--master", address, "--node-id", node_id,
                    "--dram-bytes", "16MiB", "--heartbeat", "0.2", "--host-id", "host-a",
                    "--no-prefault")
    # Another host's client: it reads over TCP, through the node's epoch check.
    client = KVStoreClient(address, host_id="host-b", config=ClientConfig(rpc_timeout_s=2.0))
    channel = grpc.insecure_channel(address)
    try:
        wait_for(lambda: len(client.status().nodes) == 1, what="node registered")
        objects = {f"obj-{i}": os.urandom(1000 + 37 * i) for i in range(40)}
        keys, values = list(objects), list(objects.values())
        assert client.put_many(list(objects.items())) == [True] * 40
        stub = pb_grpc.KVMasterStub(channel)
        (pending,) = stub.PutStart(pb.PutStartRequest(keys=["pending"], sizes=[100])).slots
        assert pending.state == pb.PUT_STATE_ALLOCATED

        master.send_signal(signal.SIGKILL)
        master.wait()
        restarted = time.monotonic()
        master, _ = spawn(tmp_path, "master-again", *master_args)
        serving = time.monotonic()

        def served() -> bool:
            try:
                return client.get_many(keys) == values
            except grpc.RpcError:
                return False

        wait_for(served, what="every sealed object served again")
        done = time.monotonic()
        print(f"\nrecovery ({backend}): {done - restarted:.3f} s from restart to the first "
              f"full read ({serving - restarted:.3f} s until the master served, "
              f"{done - serving:.3f} s after)")
        status = client.status()
        assert (status.objects, status.nodes[0].objects) == (40, 40)
        listed, truncated = client.list_objects(limit=100)
        assert ([o.location.key for o in listed], truncated) == (sorted(keys), False)
        assert all(o.sealed for o in listed)
        # The pending put was reclaimed: its writer cannot seal it, and the key is free.
        ticket = pb.PutTicket(key="pending", token=pending.grant.token)
        assert stub.PutEnd(pb.PutFinishRequest(puts=[ticket])).sealed == [False]
        assert client.exists(["pending"]) == [False]
        assert client.put_many([("after", b"x" * 3000)]) == [True]
        assert client.get_many(["after", keys[0]]) == [b"x" * 3000, values[0]]
    finally:
        client.close()
        channel.close()
        _stop(master, signal.SIGKILL)
        _stop(node, signal.SIGTERM)  # it unlinks its segment
    assert shm_files(node_id) == []
