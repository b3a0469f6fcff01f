"""The pool's Prometheus metrics: one registry per master and per node (pantry.common.metrics).

The master's state and counters live in `Master` and are read at scrape time, so a scrape shows
exactly what the master holds; only the RPC latencies are observed as they happen. A node counts
the requests and bytes its gRPC and TCP servers move; shm clients copy without the node, so their
traffic shows only in the master's puts and hits. A client counts what it refused to return
and the transports it let go of, on the registry its owner gives it (an engine's own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.block_object import Rejection
from kvstore.master import Master
from kvstore.ssd_tier import SsdTier
from kvstore.transports import READ, WRITE
from pantry.common.metrics import POOL_IO_BUCKETS
from pantry.v1 import kvstore_pb2 as pb


class _MasterCollector(Collector):
    def __init__(self, master: Callable[[], Master | None]) -> None:
        # Called at each scrape: a standby master has none, and takes a new one when elected.
        self._master = master

    def collect(self) -> Iterator[Metric]:
        master = self._master()
        if master is None:
            return
        status = master.status()
        stats = master.stats()
        gauges = (
            ("objects", "objects in the pool, sealed or being written", status.objects),
            ("used_bytes", "bytes of slots allocated on all nodes", status.used_bytes),
            ("capacity_bytes", "bytes of all nodes' segments", status.capacity_bytes),
            ("nodes_alive", "nodes registered and heartbeating", len(status.nodes)),
            ("leases_active", "objects protected from eviction for a reader",
             stats.active_leases),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"pantry_kv_master_{name}", doc, value=value)
        counters = (
            ("hits", "keys found by get", status.hits),
            ("misses", "keys not found by get", status.misses),
            ("evictions", "objects evicted to make room", status.evictions),
            ("puts_started", "puts granted a slot", stats.puts_started),
            ("puts_sealed", "puts written and sealed", status.puts),
            ("puts_aborted", "puts given up by their writer", stats.puts_aborted),
            ("puts_expired", "puts not sealed within put_timeout_s, reclaimed",
             stats.puts_expired),
            ("match_prefix_calls", "prefix lookups", stats.match_prefix_calls),
            ("blocks_matched", "blocks found by prefix lookups", stats.blocks_matched),
            ("objects_recovered", "sealed objects taken back after a restart, from the "
             "metadata store or from what re-registering nodes hold", stats.objects_recovered),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(f"pantry_kv_master_{name}", doc, value=value)
        tiers = CounterMetricFamily("pantry_kv_master_tier_moves",
                                    "copies between nodes' DRAM and SSD tiers, by kind",
                                    labels=["kind"])
        for kind, n in master.tier_counts().items():
            tiers.add_metric([kind], n)
        yield tiers
        slabs = {
            "pages": GaugeMetricFamily("pantry_kv_master_slab_pages",
                                       "slab pages a size class holds on a node",
                                       labels=["node", "slot_bytes"]),
            "slots": GaugeMetricFamily("pantry_kv_master_slab_slots",
                                       "slots in a size class's pages on a node",
                                       labels=["node", "slot_bytes"]),
            "used_slots": GaugeMetricFamily("pantry_kv_master_slab_used_slots",
                                            "slots of a size class holding an object",
                                            labels=["node", "slot_bytes"]),
        }
        for node_id, classes in master.slab_classes().items():
            for c in classes:
                labels = [node_id, str(c.slot_bytes)]
                slabs["pages"].add_metric(labels, c.pages)
                slabs["slots"].add_metric(labels, c.slots)
                slabs["used_slots"].add_metric(labels, c.used_slots)
        yield from slabs.values()


class _LeaderCollector(Collector):
    def __init__(self, leading: Callable[[], bool]) -> None:
        self._leading = leading

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pantry_kv_master_leader",
                                "1 while this master leads the pool, 0 on a standby",
                                value=int(self._leading()))


class MasterMetrics:
    def __init__(self, master: Callable[[], Master | None],
                 leading: Callable[[], bool] = lambda: True) -> None:
        """`master`: the master whose figures to export (None: none, a standby's); `leading`:
        whether this master leads now (read at each scrape)."""
        self.registry = CollectorRegistry()
        self.registry.register(_MasterCollector(master))
        self.registry.register(_LeaderCollector(leading))
        self.rpc_seconds = Histogram(
            "pantry_kv_master_rpc_seconds", "time to serve a KVMaster RPC", ["method"],
            registry=self.registry, buckets=POOL_IO_BUCKETS)
        # Every method appears from the start, so a scrape shows a zero count, not no series.
        for method in pb.DESCRIPTOR.services_by_name["KVMaster"].methods:
            self.rpc_seconds.labels(method.name)


class _SsdCollector(Collector):
    """A node's SSD tier, read from the tier at scrape time."""

    def __init__(self, ssd: SsdTier) -> None:
        self._ssd = ssd

    def collect(self) -> Iterator[Metric]:
        s = self._ssd.stats()
        for name, doc, value in (
                ("capacity_bytes", "bytes the SSD tier may hold", s.capacity_bytes),
                ("used_bytes", "bytes of the SSD tier's files", s.used_bytes),
                ("objects", "objects on the SSD tier", s.objects)):
            yield GaugeMetricFamily(f"pantry_kv_node_ssd_{name}", doc, value=value)
        for name, doc, value in (
                ("hits", "SSD reads served through the node, checked", s.hits),
                ("misses", "SSD reads through the node that found no intact file", s.misses),
                ("evictions", "SSD files deleted by the tier's watermarks", s.evictions),
                ("corrupted", "SSD files found damaged (at start or on read) and deleted",
                 s.corrupted)):
            yield CounterMetricFamily(f"pantry_kv_node_ssd_{name}", doc, value=value)
        spills = CounterMetricFamily("pantry_kv_node_ssd_spills",
                                     "spills to the SSD tier by outcome (full: refused)",
                                     labels=["outcome"])
        for outcome, n in s.spills.items():
            spills.add_metric([outcome], n)
        yield spills


class NodeMetrics:
    def __init__(self, capacity_bytes: int, transports: Sequence[str],
                 ssd: SsdTier | None = None) -> None:
        self.registry = CollectorRegistry()
        if ssd is not None:
            self.registry.register(_SsdCollector(ssd))
        Gauge("pantry_kv_node_segment_capacity_bytes", "bytes of this node's segment",
              registry=self.registry).set(capacity_bytes)
        self._requests = Counter("pantry_kv_node_requests", "read and write requests served",
                                 ["transport", "op"], registry=self.registry)
        self._bytes = {
            READ: Counter("pantry_kv_node_read_bytes", "bytes read from the segment",
                          ["transport"], registry=self.registry),
            WRITE: Counter("pantry_kv_node_written_bytes", "bytes written to the segment",
                           ["transport"], registry=self.registry),
        }
        for transport in transports:
            for op, counter in self._bytes.items():
                self._requests.labels(transport, op)
                counter.labels(transport)

    def record(self, transport: str, op: str, nbytes: int) -> None:
        """One request served; `nbytes` of it actually moved (0 for a refused request)."""
        self._requests.labels(transport, op).inc()
        self._bytes[op].labels(transport).inc(nbytes)


class ClientMetrics:
    # Why a client let go of a node's transport: the node is in a newer epoch, it is no longer
    # a member, or a request over it failed.
    DROP_REASONS = ("epoch", "gone", "error")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rejected = Counter(
            "pantry_kv_client_objects_rejected",
            "objects read and refused (a miss for the caller), by the check that failed",
            ["reason"], registry=registry)
        self.transports_dropped = Counter(
            "pantry_kv_client_transports_dropped", "node transports closed, by reason",
            ["reason"], registry=registry)
        self.transports_open = Gauge(
            "pantry_kv_client_transports_open", "node transports this client holds",
            registry=registry)
        self.read_seconds = Histogram(
            "pantry_kv_client_read_seconds", "time of one batched read from one node",
            ["transport"], registry=registry, buckets=POOL_IO_BUCKETS)
        self.read_failovers = Counter(
            "pantry_kv_client_read_failovers",
            "objects read again from another replica after their first location failed",
            registry=registry)
        for r in Rejection:
            self.rejected.labels(r.value)
        for reason in self.DROP_REASONS:
            self.transports_dropped.labels(reason)
