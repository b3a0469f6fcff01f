"""The conductor's Prometheus registry: its own request series plus the fleet as last polled.

One scrape of the conductor's /metrics shows the whole system: how requests were served and
what every engine and the pool said at the last poll. The fleet's view is a collector that
reads the fleet's state at scrape time, so nothing is copied on each poll. Its series carry
`pantry_conductor_` like the rest: an engine scraped directly exports its own series under its
own names, and the two must not add up twice in one Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pantry.common.metrics import TBT_BUCKETS, TTFT_BUCKETS

from .fleet import Fleet
from .scheduler import EngineState

# How a request was served: the `route` label.
PREFILL_THEN_DECODE = "prefill_then_decode"
DECODE_DIRECT = "decode_direct"        # every full block was in the pool: no prefill
DECODE_FALLBACK = "decode_fallback"    # no prefill engine could take it: decode computed it
DECODE_SHORT = "decode_short"          # little left to compute: decode computed it by choice
ROUTES = (PREFILL_THEN_DECODE, DECODE_DIRECT, DECODE_FALLBACK, DECODE_SHORT)

# Why a request failed: the `kind` label of the error counter.
ERROR_KINDS = ("invalid", "overloaded", "slo", "unavailable")

# Load fields an engine reports: (series name, EngineLoad field, help).
_ENGINE_GAUGES = (
    ("pantry_conductor_engine_waiting_requests", "waiting", "Requests waiting for a slot"),
    ("pantry_conductor_engine_running_requests", "running", "Requests running"),
    ("pantry_conductor_engine_kv_free_blocks", "free_blocks", "Free blocks of the paged KV cache"),
    ("pantry_conductor_engine_kv_blocks", "total_blocks", "Blocks of the paged KV cache"),
)
# Totals the engine counts up: counters here too, so rate() works on them.
_ENGINE_COUNTERS = (
    ("pantry_conductor_engine_requests", "requests_total", "Requests served"),
    ("pantry_conductor_engine_computed_tokens", "computed_tokens_total",
     "Prompt tokens computed by the model"),
    ("pantry_conductor_engine_pool_tokens", "pool_tokens_total",
     "Prompt tokens pulled from the KV pool instead of computed"),
    ("pantry_conductor_engine_busy_seconds", "busy_seconds_total", "Time spent computing"),
)
_POLLED = ", as last polled by the conductor."
_ROLE_LABELS = ("engine", "role")


class ConductorMetrics:
    """The registry one conductor serves on its HTTP port's /metrics."""

    def __init__(self, fleet: Fleet, inflight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pantry_conductor_requests",
            "Requests served, by route and finish reason (cancelled: the client left).",
            ["route", "finish"], registry=r)
        self.prompt_tokens = Counter(
            "pantry_conductor_prompt_tokens", "Prompt tokens of requests served.", registry=r)
        self.cached_tokens = Counter(
            "pantry_conductor_cached_tokens", "Prompt tokens served from the KV pool.",
            registry=r)
        self.generated_tokens = Counter(
            "pantry_conductor_generated_tokens", "Tokens generated.", registry=r)
        self.request_errors = Counter(
            "pantry_conductor_request_errors",
            "Requests refused or failed: invalid, overloaded, slo (predicted TTFT over the "
            "SLO), unavailable.", ["kind"], registry=r)
        self.ttft = Histogram(
            "pantry_conductor_time_to_first_token_seconds",
            "From a request's arrival to its first token, by route.", ["route"],
            buckets=TTFT_BUCKETS, registry=r)
        self.tbt = Histogram(
            "pantry_conductor_time_between_tokens_seconds",
            "Between consecutive token chunks streamed to a client.",
            buckets=TBT_BUCKETS, registry=r)
        self.inflight = Gauge(
            "pantry_conductor_inflight_requests", "Requests being served.", registry=r)
        self.inflight.set_function(inflight)
        # Every series a dashboard plots exists from the start, at zero.
        for kind in ERROR_KINDS:
            self.request_errors.labels(kind=kind)
        for route in ROUTES:
            self.ttft.labels(route=route)
        r.register(FleetCollector(fleet))


class FleetCollector(Collector):
    """Every role's last polled state: up, each engine's load, the pool's status."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self._fleet
        up = GaugeMetricFamily("pantry_conductor_role_up",
                               "1 when the role answered the last poll.", labels=_ROLE_LABELS)
        engine: list[tuple[GaugeMetricFamily | CounterMetricFamily, str]] = [
            (GaugeMetricFamily(name, text + _POLLED, labels=_ROLE_LABELS), field)
            for name, field, text in _ENGINE_GAUGES
        ] + [
            (CounterMetricFamily(name, text + _POLLED, labels=_ROLE_LABELS), field)
            for name, field, text in _ENGINE_COUNTERS
        ]
        states: list[EngineState[Any]] = [*fleet.prefills, *fleet.decodes]
        for st in states:
            labels = [st.info.engine_id, st.info.role]
            up.add_metric(labels, float(st.up))
            if st.load is None or not st.up:  # no numbers rather than made-up or stale ones
                continue
            for family, field in engine:
                family.add_metric(labels, float(getattr(st.load, field)))
        up.add_metric(["kvstore", "kvstore"], float(fleet.pool_up))
        yield up
        for family, _ in engine:
            yield family
        yield from self._pool()

    def _pool(self) -> Iterator[Metric]:
        pool = self._fleet.pool_status
        if pool is None or not self._fleet.pool_up:
            return
        for name, value, help_text in (
            ("pantry_conductor_pool_capacity_bytes", pool.capacity_bytes, "Pool capacity"),
            ("pantry_conductor_pool_used_bytes", pool.used_bytes, "Pool bytes in use"),
            ("pantry_conductor_pool_objects", pool.objects, "Blocks stored in the pool"),
            ("pantry_conductor_pool_nodes_alive", len(pool.nodes), "Storage nodes heartbeating"),
        ):
            yield GaugeMetricFamily(name, help_text + _POLLED, value=float(value))
        for name, value, help_text in (
            ("pantry_conductor_pool_hits", pool.hits, "Block reads that found the block"),
            ("pantry_conductor_pool_misses", pool.misses, "Block reads that missed"),
            ("pantry_conductor_pool_evictions", pool.evictions, "Blocks evicted from the pool"),
            ("pantry_conductor_pool_puts_sealed", pool.puts, "Blocks written and sealed"),
        ):
            yield CounterMetricFamily(name, help_text + _POLLED, value=float(value))
