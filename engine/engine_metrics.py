"""An engine's Prometheus series: its work, its load, its latencies and its pool traffic.

Every engine core owns one `CollectorRegistry`, served at its role's /metrics. The counters here
are the only count of the engine's work: the Load RPC reads them back (`counters()`), so the
number a conductor polls and the number a scrape shows cannot drift apart. Every series carries
`role` and `engine_id` labels, so scrapes of several engines can be merged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pantry.common.metrics import POOL_IO_BUCKETS, TBT_BUCKETS, TTFT_BUCKETS

# Decode steps (tens of ms on CPU, ms on a GPU) and prefill passes (up to seconds).
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 10.0)

LABELS = ("role", "engine_id")


@dataclass(frozen=True)
class EngineCounters:
    requests_total: int
    computed_tokens_total: int
    pool_tokens_total: int
    busy_seconds_total: float


class PoolClientMetrics:
    """What one engine moved between its cache and the pool. Every key a load asks for ends as
    exactly one of hit (copied into the cache), rejected (an object came back but failed its
    checks) or missed (absent, after the first unusable block, or the pool unreachable)."""

    def __init__(self, registry: CollectorRegistry, role: str, engine_id: str) -> None:
        labels = {"role": role, "engine_id": engine_id}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, LABELS, registry=registry,
                             buckets=POOL_IO_BUCKETS).labels(**labels)

        self.read_seconds = histogram(
            "pantry_pool_client_read_seconds",
            "Time of one load of a prompt's leading blocks from the pool (match, get, check).")
        self.write_seconds = histogram(
            "pantry_pool_client_write_seconds",
            "Time of one store of a batch of blocks into the pool.")
        self.read_bytes = counter(
            "pantry_pool_client_read_bytes",
            "Bytes of block objects fetched from the pool, usable or not.")
        self.written_bytes = counter(
            "pantry_pool_client_written_bytes",
            "Bytes of block objects the pool reports stored.")
        self.blocks_hit = counter(
            "pantry_pool_client_blocks_hit",
            "Blocks loaded from the pool into the KV cache.")
        self.blocks_missed = counter(
            "pantry_pool_client_blocks_missed",
            "Blocks asked for and not loaded: absent, behind an unusable one, or pool down.")
        self.blocks_rejected = counter(
            "pantry_pool_client_blocks_rejected",
            "Block objects the pool returned that failed the header, fingerprint, shape or "
            "checksum check.")
        self.blocks_stored = counter(
            "pantry_pool_client_blocks_stored",
            "Blocks the pool reports stored after a write.")


class EngineMetrics:
    def __init__(self, role: str, engine_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"role": role, "engine_id": engine_id}
        self._labels = labels
        registry = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=registry,
                             buckets=buckets).labels(**labels)

        self._requests = counter("pantry_engine_requests", "Requests that got a first token.")
        self._computed_tokens = counter(
            "pantry_engine_computed_tokens", "Prompt tokens whose KV this engine computed.")
        self._pool_tokens = counter(
            "pantry_engine_pool_tokens", "Prompt tokens whose KV came from the pool.")
        self._busy_seconds = counter(
            "pantry_engine_busy_seconds", "Seconds spent computing (prefill or decode steps).")
        # Measured under pantry local's adaptive split (perf sched): while prefill computed on
        # the other CPU, decode's loop spent 5% of its time waiting for the GIL, held by its own
        # pull and server threads waiting for that CPU; a step that lost 30 ms showed as a TBT
        # 1.5x the median. This counter makes such stalls visible without a profiler.
        self.loop_wait_seconds = counter(
            "pantry_engine_loop_wait_seconds",
            "Of pantry_engine_busy_seconds, the time the loop thread was off its CPU: waiting "
            "for the GIL (held by another thread of this engine), for a CPU, or for its compute "
            "threads. Steps that wait show as uneven time between tokens.")
        self.step_seconds = histogram(
            "pantry_engine_step_seconds",
            "Each loop iteration that computed: a decode step with its bookkeeping, or a "
            "prefill pass.",
            STEP_BUCKETS)
        self.local_hit_blocks = counter(
            "pantry_engine_local_hit_blocks",
            "Prompt blocks found in this engine's own prefix cache: neither pulled nor computed.")
        self.cached_blocks = gauge(
            "pantry_engine_kv_cached_blocks",
            "KV cache blocks indexed by block key (held or free), reusable by a later prompt.")
        self.preemptions = counter(
            "pantry_engine_preemptions",
            "Decode: sequences sent back to the queue to free KV blocks for the others; they "
            "resume from this engine's cache, the pool, or by recomputing.")
        self.handoff_wait_seconds = counter(
            "pantry_engine_handoff_wait_seconds",
            "Decode: seconds pulls spent waiting for blocks a prefill engine was still writing.")
        self.tails_stored = counter(
            "pantry_engine_prompt_tails_stored",
            "Prefill: prompts whose partial last block went to the pool writer under its tail "
            "key, with the prompt's last full blocks.")
        self.tails_pulled = counter(
            "pantry_engine_prompt_tails_pulled",
            "Decode: handoffs whose prompt's partial last block came from the pool, so decode "
            "computed none of the prompt.")
        self.cuda_graph_steps = gauge(
            "pantry_engine_cuda_graph_steps",
            "Decode steps replayed as CUDA graphs since start (0 where graphs are off or the "
            "device is a CPU).")
        self.compute_cpus = gauge(
            "pantry_engine_compute_cpus",
            "CPUs the engine computes on now; under pantry local's adaptive split, its own share "
            "while an engine of the other role computes, every CPU otherwise.")
        self.cpu_switches = counter(
            "pantry_engine_cpu_switches",
            "Times the adaptive CPU split moved this engine between its own share of the CPUs "
            "and every CPU.")
        self.waiting = gauge("pantry_engine_waiting_requests", "Requests queued, not started.")
        self.running = gauge("pantry_engine_running_requests", "Requests being computed.")
        self.free_blocks = gauge("pantry_engine_kv_free_blocks", "Free KV cache blocks.")
        self.total_blocks = gauge("pantry_engine_kv_blocks", "KV cache blocks in all.")
        self.ttft = histogram(
            "pantry_engine_time_to_first_token_seconds",
            "Prefill: from a job's arrival to its first token. Decode: from submit to the "
            "first token emitted.", TTFT_BUCKETS)
        self.tbt = histogram(
            "pantry_engine_time_between_tokens_seconds",
            "Decode: between consecutive tokens of one sequence.", TBT_BUCKETS)
        self.pool = PoolClientMetrics(registry, role, engine_id)
        # Load reads the four counters as one snapshot: a request is counted with its tokens.
        self._lock = threading.Lock()

    def record_request(self, computed: int, pooled: int, ttft_seconds: float) -> None:
        """Counted at the first token, so requests_total equals the TTFT histogram's count."""
        with self._lock:
            self._requests.inc()
            self._computed_tokens.inc(computed)
            self._pool_tokens.inc(pooled)
        self.ttft.observe(ttft_seconds)

    def add_busy(self, seconds: float, off_cpu_seconds: float = 0.0, *, step: bool = True
                 ) -> None:
        """One loop iteration of `seconds`, `off_cpu_seconds` of them off the CPU; `step`:
        it computed something (a decode step, a prefill pass)."""
        with self._lock:
            self._busy_seconds.inc(seconds)
        if step:
            self.step_seconds.observe(seconds)
        self.loop_wait_seconds.inc(max(0.0, off_cpu_seconds))

    def counters(self) -> EngineCounters:
        with self._lock:
            return EngineCounters(
                requests_total=int(_value(self._requests)),
                computed_tokens_total=int(_value(self._computed_tokens)),
                pool_tokens_total=int(_value(self._pool_tokens)),
                busy_seconds_total=_value(self._busy_seconds),
            )

    def watch_cache(self, free: Callable[[], int], total: Callable[[], int]) -> None:
        self.free_blocks.set_function(free)
        self.total_blocks.set_function(total)

    def watch_far_helpers(self, blocks: Callable[[], int]) -> None:
        """`blocks` returns the spans the C pool's far helpers have computed (engine.cpu_pool),
        read at every scrape: how much of a confined decode engine's long-context attention
        ran on prefill's CPUs."""
        self.registry.register(_FarHelperBlocks(blocks, self._labels))

    def watch_load(self, load: Callable[[], tuple[int, int]]) -> None:
        """`load` returns (waiting, running); read at every scrape."""
        self.waiting.set_function(lambda: load()[0])
        self.running.set_function(lambda: load()[1])


class _FarHelperBlocks(Collector):
    def __init__(self, blocks: Callable[[], int], labels: dict[str, str]) -> None:
        self._blocks = blocks
        self._labels = labels

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            "pantry_engine_far_helper_blocks",
            "Decode: work items of its attention (spans of a long context) computed by its C "
            "pool's far helpers on prefill's CPUs while it was confined to its own.",
            labels=list(self._labels))
        family.add_metric(list(self._labels.values()), self._blocks())
        return [family]


def _value(child: Counter) -> float:
    """A labelled counter's current value, through its public collect()."""
    for family in child.collect():
        for sample in family.samples:
            if sample.name == f"{family.name}_total":
                return sample.value
    raise AssertionError(f"counter {child} has no _total sample")
