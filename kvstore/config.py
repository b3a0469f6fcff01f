"""One typed, validated configuration per role. Errors name the offending setting.

The `kvstore master` and `kvstore node` flags are built from these fields (their metadata holds
the help text and, where it differs from the field name, the flag name), so every default is
written here only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvstore.eviction import POLICIES as EVICTION_POLICIES
from kvstore.slab_classes import MAX_CLASSES, PAGE_ALIGN, PAGE_BYTES
from pantry.common.config_flags import GIB, KIB, MIB
from pantry.common.errors import ConfigError

DEFAULT_MAX_OBJECT_BYTES = 64 * MIB
# A 128k-token prompt is 8,192 blocks of 16: room for that, and a bound on one request's work.
DEFAULT_MAX_KEYS_PER_REQUEST = 16_384
# gRPC frames carry a little more than the payload; the slack keeps a max-size object sendable.
MESSAGE_SLACK_BYTES = 1 * MIB
# A re-registering node lists every object it holds (about 60 bytes each): room for ~2 million.
REGISTER_MESSAGE_BYTES = 128 * MIB
# Replicas one object may have: each is a full copy, and a put writes all of them.
MAX_REPLICAS = 8
TOKEN_FILE_HELP = ("file holding the pool's service token: every kvstore RPC must carry it "
                   "(unset: no token is asked for)")


def master_addresses(text: str) -> tuple[str, ...]:
    """The masters named by `--master`: HOST:PORT, or several comma-separated (a leader and its
    standbys, in any order). The one place that parses the list."""
    addresses = tuple(a.strip() for a in text.split(","))
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not (host and sep and port.isdigit()):
            raise ConfigError(f"master: {a!r} in {text!r} is not HOST:PORT (several masters: "
                              "HOST:PORT,HOST:PORT)")
    return addresses


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
        "help": "fraction of a node's segment in use above which eviction starts"})
    low_watermark: float = field(default=0.8, metadata={
        "help": "fraction of a node's segment in use that watermark eviction brings it down to"})
    eviction: str = field(default="lru", metadata={
        "help": "which objects a full node evicts first: lru (least recently used) or reuse "
                "(least likely to be read again, learned online per class of block: "
                "kvstore.eviction)"})
    spill_watermark: float = field(default=0.7, metadata={
        "help": "fraction of a node's segment in use above which its coldest objects (in "
                "--eviction order) are copied to its SSD tier (nodes with --ssd-dir); below "
                "low_watermark, eviction finds them copied already"})
    promote_after_hits: int = field(default=2, metadata={
        "help": "reads of an object held only on SSD after which it is copied back to DRAM "
                "(0: never)"})
    tier_orders: int = field(default=64, metadata={
        "help": "most spills one node has under way at once"})
    min_slot_bytes: int = field(default=4 * KIB, metadata={
        "size": True, "help": "smallest slot the allocator hands out (a power of two)"})
    slab_page_bytes: int = field(default=PAGE_BYTES, metadata={
        "size": True, "help": "bytes of slots in one slab page, the unit that moves between "
                              "size classes (a multiple of 4 KiB; larger objects get a page "
                              "of one slot)"})
    slab_classes: int = field(default=MAX_CLASSES, metadata={
        "help": "most size classes per node; past it a size takes the smallest larger class"})
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
    replicas: int = field(default=1, metadata={
        "help": "replicas of each object, on distinct nodes, when a put asks for no number "
                f"(at most {MAX_REPLICAS}; fewer nodes: one replica on each)"})
    advertise_address: str = field(default="", metadata={
        "flag": "advertise",
        "help": "with Redis metadata: HOST:PORT that clients and nodes reach this master at, "
                "which standbys name while it leads (default: --host:the bound port)"})
    lease_ttl_s: float = field(default=3.0, metadata={
        "flag": "lease_ttl",
        "help": "with Redis metadata: seconds the leader's lease lives unless renewed; a standby "
                "master takes over this long after the leader dies"})
    lease_renew_s: float = field(default=1.0, metadata={
        "flag": "lease_renew",
        "help": "with Redis metadata: seconds between the leader's lease renewals (at most a "
                "third of --lease-ttl, so one lost renewal does not cost the lease)"})

    def __post_init__(self) -> None:
        _port("port", self.port)
        _port("metrics_port", self.metrics_port)
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(f"replicas must be in [1, {MAX_REPLICAS}], got {self.replicas}")
        if self.advertise_address:
            master_addresses(self.advertise_address)
        _positive("lease_ttl_s", self.lease_ttl_s)
        _positive("lease_renew_s", self.lease_renew_s)
        if self.lease_renew_s * 3 > self.lease_ttl_s:
            raise ConfigError(f"lease_renew_s ({self.lease_renew_s}) must be at most a third of "
                              f"lease_ttl_s ({self.lease_ttl_s})")
        _positive("max_keys_per_request", self.max_keys_per_request)
        _positive("node_timeout_s", self.node_timeout_s)
        _positive("put_timeout_s", self.put_timeout_s)
        _positive("lease_ms", self.lease_ms)
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {', '.join(sorted(EVICTION_POLICIES))}, "
                              f"got {self.eviction!r}")
        _positive("reap_interval_s", self.reap_interval_s)
        _positive("max_workers", self.max_workers)
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(
                "need 0 < low_watermark <= high_watermark <= 1, got "
                f"low_watermark={self.low_watermark} high_watermark={self.high_watermark}"
            )
        if not 0 < self.spill_watermark <= 1:
            raise ConfigError(f"spill_watermark must be in (0, 1], got {self.spill_watermark}")
        if self.promote_after_hits < 0:
            raise ConfigError(f"promote_after_hits must be >= 0, got {self.promote_after_hits}")
        _positive("tier_orders", self.tier_orders)
        if self.min_slot_bytes < 64 or self.min_slot_bytes & (self.min_slot_bytes - 1):
            # 64: objects start on their header's 64-byte alignment.
            raise ConfigError(
                f"min_slot_bytes must be a power of two >= 64, got {self.min_slot_bytes}")
        if self.slab_page_bytes < PAGE_ALIGN or self.slab_page_bytes % PAGE_ALIGN:
            raise ConfigError(f"slab_page_bytes must be a positive multiple of {PAGE_ALIGN}, "
                              f"got {self.slab_page_bytes}")
        _positive("slab_classes", self.slab_classes)
        _positive("max_object_bytes", self.max_object_bytes)
        if self.metadata != "memory" and not self.metadata.startswith("redis://"):
            raise ConfigError(
                f"metadata must be 'memory' or redis://HOST:PORT/DB, got {self.metadata!r}")


@dataclass(frozen=True)
class NodeConfig:
    master_address: str = field(metadata={
        "flag": "master", "help": "the kvstore master, HOST:PORT; with standbys, the masters "
                                  "comma-separated (the node follows the leader)"})
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
    ssd_dir: str | None = field(default=None, metadata={
        "help": "directory of the SSD tier, one file per object; a node restarted on the same "
                "directory serves its files again (unset: no SSD tier)"})
    ssd_bytes: int = field(default=16 * GIB, metadata={
        "size": True, "help": "bytes of objects the SSD tier may hold"})
    ssd_high_watermark: float = field(default=0.95, metadata={
        "help": "fraction of ssd_bytes in use above which least recently used files go"})
    ssd_low_watermark: float = field(default=0.85, metadata={
        "help": "fraction of ssd_bytes that SSD eviction brings the tier down to"})
    ssd_fsync: bool = field(default=True, metadata={
        "help": "flush each spilled file and the directory entry to the device before the "
                "copy counts as stored, so a power loss cannot leave a damaged file (off: "
                "faster spills; a damaged file is still a miss by its checksum)"})

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
        if self.ssd_dir is not None:
            if not self.ssd_dir:
                raise ConfigError("ssd_dir must name a directory (or be unset: no SSD tier)")
            _positive("ssd_bytes", self.ssd_bytes)
            if not 0 < self.ssd_low_watermark <= self.ssd_high_watermark <= 1:
                raise ConfigError(
                    "need 0 < ssd_low_watermark <= ssd_high_watermark <= 1, got "
                    f"ssd_low_watermark={self.ssd_low_watermark} "
                    f"ssd_high_watermark={self.ssd_high_watermark}")

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
    # One-sided RDMA to nodes on other hosts, where both ends have a device (over tcp).
    enable_rdma: bool = True

    def __post_init__(self) -> None:
        _positive("rpc_timeout_s", self.rpc_timeout_s)
        _positive("max_object_bytes", self.max_object_bytes)
        _positive("batch_bytes", self.batch_bytes)

    @property
    def max_message_bytes(self) -> int:
        return max(self.max_object_bytes, self.batch_bytes) + MESSAGE_SLACK_BYTES
