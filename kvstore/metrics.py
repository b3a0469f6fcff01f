"""The pool's Prometheus metrics: one registry per master and per node (pantry.common.metrics).

The master's state and counters live in `Master` and are read at scrape time, so a scrape shows
exactly what the master holds; only the RPC latencies are observed as they happen. A node counts
the requests and bytes its gRPC and TCP servers move; shm clients copy without the node, so their
traffic shows only in the master's puts and hits. A client counts what it refused to return
and the transports it let go of, on the registry its owner gives it (an engine's own).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.block_object import Rejection
from kvstore.master import Master
from kvstore.transports import READ, WRITE
from pantry.common.metrics import POOL_IO_BUCKETS
from pantry.v1 import kvstore_pb2 as pb


class _MasterCollector(Collector):
    def __init__(self, master: Master) -> None:
        self._master = master

    def collect(self) -> Iterator[Metric]:
        status = self._master.status()
        stats = self._master.stats()
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


class MasterMetrics:
    def __init__(self, master: Master) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_MasterCollector(master))
        self.rpc_seconds = Histogram(
            "pantry_kv_master_rpc_seconds", "time to serve a KVMaster RPC", ["method"],
            registry=self.registry, buckets=POOL_IO_BUCKETS)
        # Every method appears from the start, so a scrape shows a zero count, not no series.
        for method in pb.DESCRIPTOR.services_by_name["KVMaster"].methods:
            self.rpc_seconds.labels(method.name)


class NodeMetrics:
    def __init__(self, capacity_bytes: int, transports: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
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
        for r in Rejection:
            self.rejected.labels(r.value)
        for reason in self.DROP_REASONS:
            self.transports_dropped.labels(reason)
