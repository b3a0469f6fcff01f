"""Which machine am I on: decides whether a client may map a node's segment (shm transport)."""

from __future__ import annotations

import socket
from pathlib import Path


def default_host_id() -> str:
    # The boot id changes on reboot and differs between containers' hosts that share a hostname,
    # so two processes with equal ids really can see the same /dev/shm (barring namespaces, which
    # the client handles by falling back to gRPC when the segment file cannot be opened).
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"
