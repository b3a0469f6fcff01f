"""Put/get throughput of the pool per transport (shm, tcp, grpc), measured in the same run.

Runs a real master and node as processes (the node must not share the client's GIL) and
prints GB/s per transport plus each one's ratio to grpc. Every get includes the client's checks
of each object (key, layout, length, checksum); the last line prices those checks alone against
a plain copy of the same bytes, both measured here.

    PYTHONPATH=. python bench/kvstore_transport.py --object-bytes 1MiB --objects 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstore.block_object import BlockLayout, BlockObject, check_object, encode_object
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from kvstore.hostid import default_host_id
from pantry.common.config_flags import parse_size

ROOT = Path(__file__).resolve().parent.parent
# Short leases so each round's removed objects free their slots quickly (not timed).
LEASE_MS = 100


def spawn(tmp: str, name: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = Path(tmp) / f"{name}.json"
    quiet = not os.environ.get("BENCH_VERBOSE")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", *args, "--ready-file", str(ready)],
                            cwd=ROOT, stderr=subprocess.DEVNULL if quiet else None)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} failed to start")
        time.sleep(0.05)
    return proc, str(json.loads(ready.read_text())["address"])


def run(client: KVStoreClient, tag: str, size: int, n: int, rounds: int) -> tuple[float, float]:
    payloads = [os.urandom(size) for _ in range(min(n, 8))]
    best_put = best_get = 0.0
    for r in range(rounds):
        items = [(f"{tag}-{r}-{i}", payloads[i % len(payloads)]) for i in range(n)]
        t0 = time.perf_counter()
        ok = client.put_many(items)
        t1 = time.perf_counter()
        got = client.get_many([k for k, _ in items])
        t2 = time.perf_counter()
        assert all(ok) and all(g is not None for g in got), "pool too small for the benchmark"
        best_put = max(best_put, size * n / (t1 - t0) / 1e9)
        best_get = max(best_get, size * n / (t2 - t1) / 1e9)
        client.remove([k for k, _ in items])
        # Removed objects keep their slots until the read lease lapses and the master reaps.
        time.sleep(LEASE_MS / 1000 + 1.2)
    return best_put, best_get


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--object-bytes", default="1MiB")
    ap.add_argument("--objects", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    size = parse_size(ns.object_bytes)
    dram = max(256 * 1024 * 1024, 2 * size * ns.objects)
    with tempfile.TemporaryDirectory() as tmp:
        master, addr = spawn(tmp, "master", "master", "--lease-ms", str(LEASE_MS))
        node, _ = spawn(tmp, "node", "node", "--master", addr, "--node-id", f"bench-{os.getpid()}",
                        "--dram-bytes", str(dram), "--host-id", default_host_id())
        try:
            results = {}
            modes = (("shm", None, True), ("tcp", "bench-remote-host", True),
                     ("grpc", "bench-remote-host", False))
            for name, host, tcp in modes:
                # Room for each object's header (64 bytes for these keys) beside its payload.
                cfg = ClientConfig(max_object_bytes=size + 4096, enable_tcp=tcp)
                with KVStoreClient(addr, host_id=host, config=cfg) as c:
                    while not c.status().nodes:
                        time.sleep(0.05)
                    results[name] = run(c, name, size, ns.objects, ns.rounds)
        finally:
            for p in (node, master):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
    print(f"object {size} bytes x {ns.objects}, best of {ns.rounds}")
    print(f"{'transport':<10}{'put GB/s':>10}{'get GB/s':>10}")
    for name, (put, get) in results.items():
        print(f"{name:<10}{put:>10.2f}{get:>10.2f}")
    gp, gg = results["grpc"]
    for name in ("shm", "tcp"):
        p, g = results[name]
        print(f"{name}/grpc ratio: put {p / gp:.1f}x, get {g / gg:.1f}x")
    check, copy = check_cost(size)
    print(f"client-side check {check:.2f} GB/s vs plain copy {copy:.2f} GB/s "
          f"(ratio {check / copy:.2f}x)")
    return 0


def check_cost(size: int, n: int = 64) -> tuple[float, float]:
    """GB/s of checking objects (key, length, checksum) and of copying the same bytes."""
    objs = [encode_object(f"k{i}", BlockLayout.raw(size), os.urandom(size)) for i in range(8)]
    t0 = time.perf_counter()
    for i in range(n):
        assert isinstance(check_object(objs[i % 8], f"k{i % 8}"), BlockObject)
    t1 = time.perf_counter()
    for i in range(n):
        bytes(memoryview(objs[i % 8])[64:])
    t2 = time.perf_counter()
    return size * n / (t1 - t0) / 1e9, size * n / (t2 - t1) / 1e9


if __name__ == "__main__":
    sys.exit(main())
