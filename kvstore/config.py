"""One typed, validated configuration per role. Errors name the offending setting."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pantry.common.config_flags import KIB, MIB
from pantry.common.errors import ConfigError

DEFAULT_MAX_OBJECT_BYTES = 64 * MIB
# gRPC frames carry a little more than the payload; the slack keeps a max-size object sendable.
MESSAGE_SLACK_BYTES = 1 * MIB


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _port(name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be in [0, 65535], got {value}")


@dataclass(frozen=True)
class MasterConfig:
    host: str = "127.0.0.1"
    port: int = 0
    node_timeout_s: float = 10.0
    put_timeout_s: float = 30.0
    lease_ms: int = 5000
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    min_slot_bytes: int = 4 * KIB
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    reap_interval_s: float = 1.0
    metadata_backend: str = "memory"
    max_workers: int = 16

    def __post_init__(self) -> None:
        _port("port", self.port)
        _positive("node_timeout_s", self.node_timeout_s)
        _positive("put_timeout_s", self.put_timeout_s)
        _positive("lease_ms", self.lease_ms)
        _positive("reap_interval_s", self.reap_interval_s)
        _positive("max_workers", self.max_workers)
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(
                "need 0 < low_watermark <= high_watermark <= 1, got "
                f"low_watermark={self.low_watermark} high_watermark={self.high_watermark}"
            )
        if self.min_slot_bytes <= 0 or self.min_slot_bytes & (self.min_slot_bytes - 1):
            raise ConfigError(f"min_slot_bytes must be a power of two, got {self.min_slot_bytes}")
        _positive("max_object_bytes", self.max_object_bytes)
        if self.metadata_backend != "memory":
            raise ConfigError(
                f"metadata_backend must be 'memory' (redis is not built yet), "
                f"got {self.metadata_backend!r}"
            )


@dataclass(frozen=True)
class NodeConfig:
    master_address: str
    node_id: str
    dram_bytes: int = 256 * MIB
    host: str = "127.0.0.1"
    port: int = 0
    host_id: str | None = None
    heartbeat_s: float = 2.0
    shm_dir: str = "/dev/shm"
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    prefault: bool = True
    max_workers: int = 16
    # Port of the bulk TCP transport; 0 picks a free port, None turns the transport off.
    tcp_port: int | None = 0

    def __post_init__(self) -> None:
        if not self.master_address:
            raise ConfigError("master_address must be set (host:port)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.node_id or ""):
            raise ConfigError(f"node_id must match [A-Za-z0-9_.-]+, got {self.node_id!r}")
        _port("port", self.port)
        if self.tcp_port is not None:
            _port("tcp_port", self.tcp_port)
        _positive("dram_bytes", self.dram_bytes)
        _positive("heartbeat_s", self.heartbeat_s)
        _positive("max_object_bytes", self.max_object_bytes)
        _positive("max_workers", self.max_workers)

    @property
    def max_message_bytes(self) -> int:
        return self.max_object_bytes + MESSAGE_SLACK_BYTES


@dataclass(frozen=True)
class ClientConfig:
    rpc_timeout_s: float = 10.0
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    # Reads of several objects from one node are packed into messages of at most this size.
    batch_bytes: int = 16 * MIB
    enable_shm: bool = True
    enable_tcp: bool = True

    def __post_init__(self) -> None:
        _positive("rpc_timeout_s", self.rpc_timeout_s)
        _positive("max_object_bytes", self.max_object_bytes)
        _positive("batch_bytes", self.batch_bytes)

    @property
    def max_message_bytes(self) -> int:
        return max(self.max_object_bytes, self.batch_bytes) + MESSAGE_SLACK_BYTES
