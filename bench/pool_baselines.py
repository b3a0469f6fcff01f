"""The baselines of bench/pool_throughput.py: what the machine moves without the pool, each
over distinct memory of the same total size as the pool's rows (one buffer reused would stay in
the CPU's cache).

- a plain socket `sendall` / `recv_into` loop between two processes (each direction);
- a single-thread `numpy.copyto`;
- redis-server SET and GET (redis-py, with hiredis when it is installed, and GET through a
  minimal RESP client that receives into preallocated buffers);
- `readinto` of files in a directory (the SSD baseline).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis


def best_of(rounds: int, run: Callable[[], float]) -> float:
    """The shortest of `rounds` runs of `run`, which returns the seconds it measured."""
    return min(run() for _ in range(rounds))



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(tmp: Path) -> Iterator[redis.Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(tmp), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield r
    finally:
        r.close()
        proc.terminate()
        proc.wait(timeout=10)


def messages(size: int, count: int) -> list[memoryview]:
    """`count` distinct buffers of `size` bytes, every page touched: the same memory a pool
    read or write of as many objects touches (a single buffer would stay in the CPU's cache)."""
    mem = memoryview(bytearray(size * count))
    mem[:] = os.urandom(size) * count
    return [mem[i * size : (i + 1) * size] for i in range(count)]


def _socket_peer(port: int, size: int, count: int, rounds: int, direction: str) -> None:
    """The other process of the socket loop: receives (`direction` "put") or sends ("get")
    `count` messages of `size` bytes per round, over one connection."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        bufs = messages(size, count)
        for _ in range(rounds):
            if direction == "put":
                for buf in bufs:
                    got = 0
                    while got < size:
                        got += s.recv_into(buf[got:])
                s.sendall(b"k")
            else:
                s.recv(1)
                for buf in bufs:
                    s.sendall(buf)


def socket_loop(size: int, count: int, rounds: int, direction: str) -> float:
    """Best GB/s of a plain sendall/recv_into loop between this process and another."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        peer = mp.get_context("spawn").Process(
            target=_socket_peer, args=(srv.getsockname()[1], size, count, rounds, direction))
        peer.start()
        conn, _ = srv.accept()
    bufs = messages(size, count)
    best = float("inf")
    with conn:
        for _ in range(rounds):
            start = time.perf_counter()
            if direction == "put":
                for buf in bufs:
                    conn.sendall(buf)
                conn.recv(1)
            else:
                conn.sendall(b"g")
                for buf in bufs:
                    got = 0
                    while got < size:
                        got += conn.recv_into(buf[got:])
            best = min(best, time.perf_counter() - start)
    peer.join(timeout=30)
    return size * count / best / 1e9


def memcpy(size: int, count: int, rounds: int) -> float:
    """Single-thread numpy.copyto of `count` distinct objects into distinct buffers."""
    src = [np.frombuffer(m, np.uint8) for m in messages(size, count)]
    dst = [np.frombuffer(m, np.uint8) for m in messages(size, count)]

    def run() -> float:
        start = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            np.copyto(d, s)
        return time.perf_counter() - start

    return size * count / best_of(rounds, run) / 1e9


def file_read(directory: Path, size: int, count: int, rounds: int) -> float:
    payload = os.urandom(size)
    paths = [directory / f"obj-{size}-{i}" for i in range(count)]
    for p in paths:
        p.write_bytes(payload)
    bufs = messages(size, count)

    def run() -> float:
        start = time.perf_counter()
        for p, buf in zip(paths, bufs, strict=True):
            with open(p, "rb", buffering=0) as f:
                f.readinto(buf)  # type: ignore[attr-defined]
        return time.perf_counter() - start

    try:
        return size * count / best_of(rounds, run) / 1e9
    finally:
        for p in paths:
            p.unlink()


def redis_set_get(r: redis.Redis, size: int, count: int, rounds: int
                  ) -> tuple[float, float, float]:
    """GB/s of SET and GET through redis-py, and of GET through a minimal client."""
    payloads = [os.urandom(size) for _ in range(4)]
    keys = [f"bench-{size}-{i}" for i in range(count)]

    def put() -> float:
        start = time.perf_counter()
        for i, k in enumerate(keys):
            r.set(k, payloads[i % 4])
        return time.perf_counter() - start

    def get() -> float:
        start = time.perf_counter()
        for k in keys:
            assert len(r.get(k)) == size  # type: ignore[arg-type]
        return time.perf_counter() - start

    put_s = best_of(rounds, put)
    get_s = best_of(rounds, get)
    bufs = messages(size + 64, len(keys))
    raw_s = best_of(rounds, lambda: _raw_get(r.connection_pool.connection_kwargs["port"],
                                             keys, bufs))
    r.delete(*keys)
    return tuple(size * count / t / 1e9 for t in (put_s, get_s, raw_s))  # type: ignore[return-value]


def _raw_get(port: int, keys: Sequence[str], bufs: Sequence[memoryview]) -> float:
    """Seconds to GET `keys` with a minimal RESP client that receives each value straight into
    one buffer: what redis-server serves, whatever the client library's parser costs (redis-py
    without hiredis parses bulk replies in Python)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for k, buf in zip(keys, bufs, strict=True):
            s.sendall(f"*2\r\n$3\r\nGET\r\n${len(k)}\r\n{k}\r\n".encode())
            got = s.recv_into(buf)
            end = bytes(buf[:32]).index(b"\r\n")
            total = end + 2 + int(bytes(buf[1:end])) + 2
            while got < total:
                got += s.recv_into(buf[got:])
        return time.perf_counter() - start
