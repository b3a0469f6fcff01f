"""What every Pantry server process does the same way: gRPC options and server, health and
reflection, readiness, signals, logging, tables."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Every channel and server Pantry opens: large messages (KV blocks over the gRPC fallback),
    and no SO_REUSEPORT, so two servers can never silently share a port."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def write_ready_file(path: str | Path | None, address: str, **extra: object) -> None:
    """Announces that a server is serving, atomically, so a launcher never reads half a file."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **extra}))
    os.replace(tmp, path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned columns under a ruled header, for CLI state listings."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wait_for_signal(on_stop: Callable[[], None] | None = None) -> int:
    """Blocks the main thread until SIGINT or SIGTERM, then runs `on_stop` once."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    stop.wait()
    logging.getLogger("pantry").info("stopping on %s", signal.Signals(received[0]).name)
    if on_stop is not None:
        on_stop()
    return 0


def configure_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {role:<9} %(levelname)-5s %(name)s: %(message)s",
        stream=sys.stderr,
        datefmt="%H:%M:%S",
    )


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server, service_names: Sequence[str]
) -> health.HealthServicer:
    """Registers grpc.health.v1 (every service SERVING) and reflection; returns the health
    servicer so the caller can flip it to NOT_SERVING on shutdown."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


def create_grpc_server(
    host: str,
    port: int,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    *,
    max_workers: int = 32,
    thread_name_prefix: str = "",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A bound, not yet started, threaded gRPC server with health and reflection, its port and
    its health servicer. Port 0 picks a free port; a port that cannot be bound raises OSError."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
        options=grpc_options(max_message_bytes),
        interceptors=list(interceptors),
    )
    register(server)
    servicer = add_health_and_reflection(server, service_names)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"port: cannot listen on {host}:{port}")
    return server, bound, servicer
