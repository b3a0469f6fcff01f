"""`kvstore bench`: put and get throughput of a running pool, for operators.

Stores `count` objects of `object_size` random bytes through one transport, reads them back
straight into preallocated buffers (`KVStoreClient.read_into`, the engines' path, every object
checked), then removes them. The transport is chosen the way the client chooses it: `shm`
reads as a client on a node's own host, `tcp` and `grpc` as a client on another host (with
the node's bulk TCP port, or without it).

`--tier ssd` reads the objects' SSD copies: once stored, the bench waits for the nodes to spill
them to their SSD tiers (in the background, as the master orders when a node's DRAM is over its
spill watermark), then reads each from its SSD replica's location as the master lists it, so
nothing of anyone's is evicted from DRAM for the bench. A client on a node's host (shm) reads
the node's files; one on another host reads them through the node. The OS page cache may hold
files just written: the rate is then that of the cache, not of the device.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig
from kvstore.errors import KVStoreError
from kvstore.hostid import default_host_id
from kvstore.metadata import SSD, BlockLocation, NodeInfo
from kvstore.prefix_match import PrefixMatch

TRANSPORTS = ("shm", "tcp", "grpc")
# The tiers a bench reads from: DRAM, or the copies the nodes spilled to their SSD tiers.
TIERS = ("dram", SSD)
# A client on no node's host: it reaches every node over the network.
REMOTE_HOST_ID = "kvstore-bench-remote"
# Objects per put or read call: enough to batch, few enough for the progress bar to move.
_BATCH_BYTES = 64 * 1024 * 1024
_DISTINCT_PAYLOADS = 4
# Keys per match or remove call: within the master's default max_keys_per_request.
_MAX_KEYS = 4096
# Replicas listed at once for tier ssd: each key's DRAM and SSD copies (a few per key).
_MAX_LISTED = 16_384


class BenchError(KVStoreError):
    """The pool cannot run the bench as asked (no node for the transport, nothing stored)."""


@dataclass(frozen=True)
class BenchConfig:
    object_size: int
    count: int
    transport: str = "tcp"
    tier: str = "dram"
    host_id: str = field(default_factory=default_host_id)  # this host, for shm
    spill_wait_s: float = 60.0  # tier ssd: how long the nodes may take to spill every object

    def __post_init__(self) -> None:
        if self.object_size <= 0 or self.count <= 0:
            raise BenchError(f"object size and count must be > 0, got {self.object_size} "
                             f"and {self.count}")
        if self.transport not in TRANSPORTS:
            raise BenchError(f"transport {self.transport!r}: choose one of {TRANSPORTS}")
        if self.tier not in TIERS:
            raise BenchError(f"tier {self.tier!r}: choose one of {TIERS}")
        if self.tier == SSD and self.count > _MAX_KEYS:
            raise BenchError(f"tier ssd reads at most {_MAX_KEYS} objects, got {self.count}")


@dataclass(frozen=True)
class BenchResult:
    transport: str
    tier: str
    object_size: int
    count: int
    stored: int  # objects the pool took (fewer when it ran out of room)
    hits: int  # of those, read back intact
    put_bytes: int
    get_bytes: int
    put_seconds: float
    get_seconds: float
    transports: tuple[str, ...]  # what the client actually used, per node it reached

    @property
    def put_gb_per_s(self) -> float:
        return self.put_bytes / self.put_seconds / 1e9 if self.put_seconds else 0.0

    @property
    def get_gb_per_s(self) -> float:
        return self.get_bytes / self.get_seconds / 1e9 if self.get_seconds else 0.0

    def as_json(self) -> dict[str, object]:
        out = asdict(self)
        out["transports"] = list(self.transports)
        out["put_gb_per_s"] = round(self.put_gb_per_s, 3)
        out["get_gb_per_s"] = round(self.get_gb_per_s, 3)
        return out


Progress = Callable[[int], None]  # told of bytes moved


def bench_client(master: str, cfg: BenchConfig, timeout_s: float,
                 token: str | None) -> KVStoreClient:
    """A client that reaches the pool's nodes through `cfg.transport`."""
    host_id = cfg.host_id if cfg.transport == "shm" else REMOTE_HOST_ID
    # Room for the header beside the payload (a bench key's header is under 4 KiB).
    config = ClientConfig(rpc_timeout_s=timeout_s, enable_shm=cfg.transport == "shm",
                          enable_tcp=cfg.transport != "grpc",
                          max_object_bytes=cfg.object_size + 4096)
    return KVStoreClient(master, host_id=host_id, config=config, token=token)


def run_bench(client: KVStoreClient, cfg: BenchConfig, progress: Progress = lambda n: None
              ) -> BenchResult:
    nodes = [n.node for n in client.status().nodes]
    if cfg.transport == "shm" and not any(n.host_id == cfg.host_id for n in nodes):
        raise BenchError(f"shm needs a node on this host ({cfg.host_id}); the pool's nodes "
                         f"are on {sorted({n.host_id for n in nodes}) or 'no host'}")
    if cfg.transport == "tcp" and not any(n.tcp_address for n in nodes):
        raise BenchError("tcp needs a node that serves bulk TCP (started without --no-tcp)")
    if cfg.tier == SSD and not any(n.ssd_bytes for n in nodes):
        raise BenchError("tier ssd needs a node with an SSD tier (kvstore node --ssd-dir)")
    run = uuid.uuid4().hex[:12]
    keys = [f"bench-{run}-{i}" for i in range(cfg.count)]
    payloads = [os.urandom(cfg.object_size) for _ in range(min(cfg.count, _DISTINCT_PAYLOADS))]
    per_batch = min(_MAX_KEYS, max(1, _BATCH_BYTES // cfg.object_size))
    stored: list[str] = []
    try:
        start = time.perf_counter()
        for first in range(0, len(keys), per_batch):
            chunk = keys[first : first + per_batch]
            ok = client.put_many([(k, payloads[(first + i) % len(payloads)])
                                  for i, k in enumerate(chunk)])
            stored.extend(k for k, good in zip(chunk, ok, strict=True) if good)
            progress(len(chunk) * cfg.object_size)
        put_s = time.perf_counter() - start
        if not stored:
            raise BenchError("the pool stored none of the objects (out of room?)")
        buffers = [bytearray(cfg.object_size) for _ in range(min(per_batch, len(stored)))]
        matches = (_ssd_copies(client, f"bench-{run}-", stored, cfg.spill_wait_s, per_batch)
                   if cfg.tier == SSD else None)
        hits = 0
        start = time.perf_counter()
        for i, batch in enumerate(_batches(stored, per_batch)):
            got = (client.read_into(batch, buffers[: len(batch)]) if matches is None
                   else client.read_into(matches[i], buffers[: len(batch)]))
            hits += sum(o is not None for o in got.objects)
            progress(len(batch) * cfg.object_size)
        get_s = time.perf_counter() - start
        # The nodes that hold what was stored, and how this client reached them.
        if matches is None:
            holders = client.match_prefix(stored[:_MAX_KEYS]).nodes
            used = tuple(sorted({client.transport_name(n) for n in holders} - {""}))
        else:
            used = tuple(sorted({_ssd_path(client, n) for m in matches for n in m.nodes}))
    finally:
        for batch in _batches(stored, _MAX_KEYS):
            client.remove(batch)
    # Rates count payload bytes, as a caller sees them (each object's header is extra).
    return BenchResult(cfg.transport, cfg.tier, cfg.object_size, cfg.count, len(stored), hits,
                       len(stored) * cfg.object_size, hits * cfg.object_size, put_s, get_s, used)


def _ssd_copies(client: KVStoreClient, prefix: str, keys: Sequence[str], wait_s: float,
                per_batch: int) -> list[PrefixMatch]:
    """Where the SSD copy of each of `keys` lives, as matches of `per_batch` keys, once every
    one has been spilled (BenchError after `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        listed, _ = client.list_objects(prefix, limit=_MAX_LISTED)
        ssd = {o.location.key: o.location for o in listed
               if o.sealed and o.location.tier == SSD}
        if len(ssd) >= len(keys):
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"{len(ssd)} of {len(keys)} objects reached an SSD tier within {wait_s:g} s: "
                "nodes spill once their DRAM is over the master's --spill-watermark; store "
                "more (--count) or give the master a lower --spill-watermark")
        time.sleep(0.1)
    nodes = {n.node.node_id: n.node for n in client.status().nodes}
    return [_match(batch, [ssd[k] for k in batch], nodes) for batch in _batches(keys, per_batch)]


def _match(keys: Sequence[str], locs: Sequence[BlockLocation],
           nodes: dict[str, NodeInfo]) -> PrefixMatch:
    index: dict[str, int] = {}  # node id -> its place in the match's nodes
    node_index = [index.setdefault(loc.node_id, len(index)) for loc in locs]
    return PrefixMatch(list(keys), tuple(nodes[n] for n in index), node_index,
                       [loc.offset for loc in locs], [loc.length for loc in locs],
                       [loc.epoch for loc in locs], [loc.tier for loc in locs])


def _ssd_path(client: KVStoreClient, node: NodeInfo) -> str:
    """How `client` reads `node`'s SSD files (`kvstore.transports.ssd`): itself on the node's
    host, through the node's gRPC otherwise."""
    local = node.host_id == client.host_id and bool(node.ssd_dir) and os.path.isdir(
        node.ssd_dir)
    return "file" if local else "grpc"


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
