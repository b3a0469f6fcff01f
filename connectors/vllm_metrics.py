"""The connector's own metrics, carried by vLLM's KV-connector stats (part of the connector:
imports vLLM).

The worker counts what it moved; vLLM hands each step's counts from the worker to the API
server process, which logs them with its throughput line ("KV Transfer metrics: ...") and adds
them to counters on its /metrics, `vllm:pantry_<name>_total` per engine. vLLM's own
`vllm:external_prefix_cache_hits_total` counts the scheduler's hits in tokens; these say what
the worker then got: blocks in place, blocks refused (recomputed), bytes and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

COUNTERS = {
    "loaded_blocks": "Blocks read from the pool into vLLM's pages (pool hits in place)",
    "failed_blocks": "Blocks planned from the pool that were missing, refused on a check or "
                     "unreachable: vLLM recomputed them",
    "load_bytes": "Bytes read from the pool for loads",
    "load_seconds": "Seconds the worker spent loading from the pool, inside steps",
    "saved_blocks": "Blocks stored into the pool",
    "dropped_blocks": "Blocks not stored: save backlog full, pool down or out of space",
}


@dataclass
class PantryConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counts since the last report, `data` = {name in COUNTERS: value} (plain, so it crosses
    vLLM's process boundaries as it is)."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def add(self, name: str, value: float) -> None:
        assert name in COUNTERS, name
        if value:
            self.data[name] = self.data.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(v, 4) if isinstance(v, float) else v for name, v in self.data.items()}

    def is_empty(self) -> bool:
        return not self.data


class PantryPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, metric_types: dict[type, type],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {name: self._counter_cls(name=f"vllm:pantry_{name}", documentation=doc,
                                                  labelnames=self._labelnames)
                          for name, doc in COUNTERS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.items():
            counter = self._counters.get(name)
            if counter is not None and value:
                counter.labels(*labels).inc(value)
