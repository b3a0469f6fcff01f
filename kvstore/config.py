"""One typed, validated configuration per role. Errors name the offending setting.

The `kvstore master` and `kvstore node` flags are built from these fields (their metadata holds
the help text and, where it differs from the field name, the flag name), so every default is
written here only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pantry.common.config_flags import KIB, MIB
from pantry.common.errors import ConfigError

DEFAULT_MAX_OBJECT_BYTES = 64 * MIB
# A 128k-token prompt is 8,192 blocks of 16: room for that, and a bound on one request's work.
DEFAULT_MAX_KEYS_PER_REQUEST = 16_384
# gRPC frames carry a little more than the payload; the slack keeps a max-size object sendable.
MESSAGE_SLACK_BYTES = 1 * MIB
# A re-registering node lists every object it holds (about 60 bytes each): room for ~2 million.
REGISTER_MESSAGE_BYTES = 128 * MIB
TOKEN_FILE_HELP = ("file holding the pool's service token: every kvstore RPC must carry it "
                   "(unset: no token is asked for)")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _port(name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be in [0, 65535], got {value}")


@dataclass(frozen=True)
class MasterConfig:
    host: str = field(default="127.0.0.1",
                      metadata={"help": "address to serve gRPC and /metrics on"})
    port: int = field(default=0, metadata={"help": "gRPC port (0: any free port)"})
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics port (0: any free port)"})
    node_timeout_s: float = field(default=10.0, metadata={
        "flag": "node_timeout",
        "help": "seconds without a heartbeat before a node and its objects are dropped"})
    put_timeout_s: float = field(default=30.0, metadata={
        "flag": "put_timeout",
        "help": "seconds a started put may stay unsealed before its slot is reclaimed"})
    lease_ms: int = field(default=5000, metadata={
        "help": "milliseconds a location handed to a reader stays safe from eviction and reuse"})
    high_watermark: float = field(default=0.9, metadata={
        "help": "fraction of a node's segment in use above which LRU eviction starts"})
    low_watermark: float = field(default=0.8, metadata={
        "help": "fraction of a node's segment in use that watermark eviction brings it down to"})
    min_slot_bytes: int = field(default=4 * KIB, metadata={
        "size": True, "help": "smallest slot the allocator hands out (a power of two)"})
    max_object_bytes: int = field(default=DEFAULT_MAX_OBJECT_BYTES, metadata={
        "size": True, "help": "largest object a put may store"})
    reap_interval_s: float = field(default=1.0, metadata={
        "flag": "reap_interval",
        "help": "seconds between sweeps for silent nodes, abandoned puts and expired leases"})
    metadata: str = field(default="memory", metadata={
        "help": "where objects, nodes and put states live: 'memory' (lost with the master; "
                "nodes report what they hold when they register again) or "
                "redis://HOST:PORT/DB (a redis-server; a restarted master reloads them)"})
    max_keys_per_request: int = field(default=DEFAULT_MAX_KEYS_PER_REQUEST, metadata={
        "help": "most keys one request may name (more: RESOURCE_EXHAUSTED)"})
    max_workers: int = field(default=16, metadata={"help": "gRPC server threads"})
    token_file: str | None = field(default=None, metadata={"help": TOKEN_FILE_HELP})

    def __post_init__(self) -> None:
        _port("port", self.port)
        _port("metrics_port", self.metrics_port)
        _positive("max_keys_per_request", self.max_keys_per_request)
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
        if self.metadata != "memory" and not self.metadata.startswith("redis://"):
            raise ConfigError(
                f"metadata must be 'memory' or redis://HOST:PORT/DB, got {self.metadata!r}")


@dataclass(frozen=True)
class NodeConfig:
    master_address: str = field(metadata={"flag": "master",
                                          "help": "the kvstore master, HOST:PORT"})
    node_id: str = field(metadata={"help": "this node's name in the pool ([A-Za-z0-9_.-]+)"})
    dram_bytes: int = field(default=256 * MIB, metadata={
        "size": True, "help": "size of the shared-memory segment objects are stored in"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to serve gRPC, bulk TCP and /metrics on"})
    port: int = field(default=0, metadata={"help": "gRPC port (0: any free port)"})
    host_id: str | None = field(default=None, metadata={
        "help": "which machine this is: clients with the same id map the segment directly; "
                "unset, it is derived from the hostname and boot id"})
    heartbeat_s: float = field(default=2.0, metadata={
        "flag": "heartbeat", "help": "seconds between heartbeats to the master"})
    shm_dir: str = field(default="/dev/shm", metadata={
        "help": "directory of the segment file (a tmpfs)"})
    max_object_bytes: int = field(default=DEFAULT_MAX_OBJECT_BYTES, metadata={
        "size": True, "help": "largest object a write may carry"})
    prefault: bool = field(default=True, metadata={
        "help": "touch every page of the segment at start"})
    max_ops_per_request: int = field(default=DEFAULT_MAX_KEYS_PER_REQUEST, metadata={
        "help": "most reads or writes one request may carry (more: RESOURCE_EXHAUSTED)"})
    max_request_bytes: int = field(default=256 * MIB, metadata={
        "size": True, "help": "most bytes one request may read or write (more: "
                              "RESOURCE_EXHAUSTED); never below max_object_bytes"})
    max_workers: int = field(default=16, metadata={"help": "gRPC server threads"})
    # None turns the bulk TCP transport off (the CLI's --no-tcp).
    tcp_port: int | None = field(default=0, metadata={
        "help": "bulk TCP transport port (0: any free port)"})
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics port (0: any free port)"})
    token_file: str | None = field(default=None, metadata={"help": TOKEN_FILE_HELP})

    def __post_init__(self) -> None:
        if not self.master_address:
            raise ConfigError("master_address must be set (host:port)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.node_id or ""):
            raise ConfigError(f"node_id must match [A-Za-z0-9_.-]+, got {self.node_id!r}")
        _port("port", self.port)
        if self.tcp_port is not None:
            _port("tcp_port", self.tcp_port)
        _port("metrics_port", self.metrics_port)
        _positive("dram_bytes", self.dram_bytes)
        _positive("heartbeat_s", self.heartbeat_s)
        _positive("max_object_bytes", self.max_object_bytes)
        _positive("max_workers", self.max_workers)
        _positive("max_ops_per_request", self.max_ops_per_request)
        _positive("max_request_bytes", self.max_request_bytes)

    @property
    def request_bytes_limit(self) -> int:
        """Bytes one request may move: one largest object always fits."""
        return max(self.max_request_bytes, self.max_object_bytes)

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
