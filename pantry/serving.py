"""What every Pantry server process does the same way: grpc options, readiness, signals."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
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


def add_health_and_reflection(server: object, service_names: list[str]) -> object:
    """Registers grpc.health.v1 (every service SERVING) and reflection; returns the health
    servicer so the caller can flip it to NOT_SERVING on shutdown."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer
