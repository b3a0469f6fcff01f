"""Two real `kvstore master` processes on one real redis-server, a real node, a client running a
put/get loop: SIGKILL the leader, and the standby takes over. No wrong data ever, every
operation completes or fails UNAVAILABLE, operations resume, the node keeps its epoch, and every
object stored before the kill still reads. Prints the failover time."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from kvstore.event_watch import EventWatcher
from kvstore.events import EventGap, EventKind, PoolEvent
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.kv_helpers import RedisServer, free_port, spawn, wait_for


def _value(key: str) -> bytes:
    # Every key has exactly one value: any other bytes for it would be wrong data.
    digest = hashlib.sha256(key.encode()).digest()
    return digest * (8 + digest[0] % 32)


@dataclass
class _Op:
    kind: str
    start: float
    end: float
    ok: bool
    error: grpc.StatusCode | None = None


def _serves(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.KVMasterStub(ch).Status(pb.StatusRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False


def test_sigkill_of_the_leader_under_a_put_get_loop(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    masters = ",".join(addresses)
    procs = []
    try:
        for i, port in enumerate(ports):
            proc, _ = spawn(tmp_path, f"master-{i}", "master", "--port", str(port),
                            "--metadata", redis_server.url(0), "--reap-interval", "0.1",
                            "--node-timeout", "10")
            procs.append(proc)
            if i == 0:
                wait_for(lambda: _serves(addresses[0]), what="first master leading")
        leader, standby = procs
        node, _ = spawn(tmp_path, "node", "node", "--master", masters, "--node-id",
                        f"fo-{os.getpid()}", "--dram-bytes", "32MiB", "--heartbeat", "0.3",
                        "--host-id", "host-a", "--no-prefault")
        procs.append(node)
        client = KVStoreClient(masters, host_id="host-b",
                               config=ClientConfig(rpc_timeout_s=5.0))
        wait_for(lambda: len(client.status().nodes) == 1, what="node registered")
        epoch = client.status().nodes[0].node.epoch

        ops: list[_Op] = []
        wrong: list[str] = []
        stored: list[str] = []
        stop = threading.Event()

        def loop() -> None:
            i = 0
            while not stop.is_set():
                key = f"fo-{i}"
                i += 1
                for kind in ("put", "get"):
                    start = time.monotonic()
                    try:
                        if kind == "put":
                            ok = client.put_many([(key, _value(key))]) == [True]
                            if ok:
                                stored.append(key)
                        else:
                            keys = stored[-8:]
                            got = client.get_many(keys)
                            wrong.extend(k for k, v in zip(keys, got, strict=True)
                                         if v is not None and v != _value(k))
                            ok = None not in got
                    except grpc.RpcError as e:
                        code = e.code() if isinstance(e, grpc.Call) else None
                        ops.append(_Op(kind, start, time.monotonic(), False, code))
                        continue
                    ops.append(_Op(kind, start, time.monotonic(), ok))

        # A watcher of the pool's events follows the failover too.
        watcher = EventWatcher(masters, "", from_seq=1)
        seen: list[PoolEvent | EventGap] = []
        watching = threading.Thread(target=lambda: seen.extend(watcher), daemon=True)
        watching.start()
        worker = threading.Thread(target=loop)
        worker.start()
        try:
            wait_for(lambda: len(stored) >= 50, what="50 puts before the kill")
            before = list(stored)
            leader.send_signal(signal.SIGKILL)
            leader.wait()
            killed = time.monotonic()
            wait_for(lambda: any(o.ok and o.start > killed for o in ops), timeout=30,
                     what="operations resumed on the standby")
            time.sleep(1.0)
        finally:
            stop.set()
            worker.join(timeout=30)
        resumed = min(o.end for o in ops if o.ok and o.start > killed)
        stalled = max(o.end - o.start for o in ops)
        print(f"\nfailover: operations resumed {resumed - killed:.3f} s after SIGKILL of the "
              f"leader (longest operation {stalled:.3f} s; {len(ops)} operations, "
              f"{sum(not o.ok for o in ops)} not ok)")

        assert wrong == []
        assert {o.error for o in ops if o.error is not None} <= {grpc.StatusCode.UNAVAILABLE}
        assert resumed - killed < 30
        # A get of stored keys never misses. A put not stored (False) is one the dead leader
        # granted and the new one reclaimed (its seal came too late): it spans the kill.
        refused = [o for o in ops if not o.ok and o.error is None]
        assert all(o.kind == "put" and o.start < killed < o.end for o in refused), refused
        assert any(o.ok and o.kind == "put" and o.start > killed for o in ops)
        # The node kept its registration through the failover; nothing sealed was lost.
        status = client.status()
        assert [n.node.epoch for n in status.nodes] == [epoch]
        assert client.get_many(before) == [_value(k) for k in before]
        assert standby.poll() is None
        # The events: the first run's, then the new leader's from its first, which include a
        # `stored` event for every object it recovered.
        wait_for(lambda: any(isinstance(e, PoolEvent) and e.kind is EventKind.STORED
                             and e.key == stored[-1] and e.run_id != seen[0].run_id
                             for e in seen), what="events of the new leader")
        watcher.close()
        runs = list(dict.fromkeys(e.run_id for e in seen))
        assert len(runs) == 2 and not any(isinstance(e, EventGap) for e in seen)
        first_run = [e for e in seen if isinstance(e, PoolEvent) and e.run_id == runs[0]]
        second = [e for e in seen if isinstance(e, PoolEvent) and e.run_id == runs[1]]
        assert [e.seq for e in first_run] == list(range(1, len(first_run) + 1))
        assert [e.seq for e in second] == list(range(1, len(second) + 1))
        assert set(before) <= {e.key for e in second if e.kind is EventKind.STORED}
        client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        redis_server.stop()


def _refusal(address: str) -> str | None:
    """None when `address` serves; else the details of its refusal."""
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.KVMasterStub(ch).Status(pb.StatusRequest(), timeout=2)
            return None
        except grpc.RpcError as e:
            return e.details() if isinstance(e, grpc.Call) else str(e)


def test_a_paused_leader_is_standby_when_it_wakes(tmp_path: Path) -> None:
    """SIGSTOP the leader past its lease: the standby takes over, and the old leader, woken,
    serves nothing and names the new one (its lease check runs on time, not on its thread)."""
    redis_server = RedisServer(tmp_path)
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    try:
        for i, port in enumerate(ports):
            proc, _ = spawn(tmp_path, f"master-{i}", "master", "--port", str(port),
                            "--metadata", redis_server.url(0), "--lease-ttl", "1.5",
                            "--lease-renew", "0.5")
            procs.append(proc)
            if i == 0:
                wait_for(lambda: _serves(addresses[0]), what="first master leading")
        # A standby names the leader once it has read the lease (its first read may come
        # after it starts serving refusals).
        wait_for(lambda: _refusal(addresses[1]) == f"standby; leader is {addresses[0]}",
                 timeout=10, what="the standby names the leader")
        procs[0].send_signal(signal.SIGSTOP)
        wait_for(lambda: _serves(addresses[1]), timeout=15, what="standby took over")
        procs[0].send_signal(signal.SIGCONT)
        assert _refusal(addresses[0]) is not None  # not one call served after waking
        wait_for(lambda: _refusal(addresses[0]) == f"standby; leader is {addresses[1]}",
                 timeout=10, what="the woken leader names the new one")
        assert _serves(addresses[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        redis_server.stop()
