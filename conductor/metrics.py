"""A small Prometheus text-format registry: counters and histograms with labels."""

from __future__ import annotations

import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _num(v: float) -> str:
    # Exact integers, never 1.23457e+06: counters that lose digits look stalled to rate().
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help_text)
        self._buckets[name] = buckets

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self._buckets[name]
        with self._lock:
            series = self._hist[name].setdefault(key, [0.0] * (len(buckets) + 2))
            for i, bound in enumerate(buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += 1  # count
            series[-1] += value  # sum

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, tuple[str, dict[Labels, float]]] | None = None) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in sorted(self._help.items()):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for labels, v in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_fmt(labels)} {_num(v)}")
                else:
                    for labels, series in sorted(self._hist[name].items()):
                        for bound, count in zip(self._buckets[name], series, strict=False):
                            lines.append(f"{name}_bucket{_fmt(labels, (('le', f'{bound:g}'),))} "
                                         f"{_num(count)}")
                        lines.append(f"{name}_bucket{_fmt(labels, (('le', '+Inf'),))} "
                                     f"{_num(series[-2])}")
                        lines.append(f"{name}_count{_fmt(labels)} {_num(series[-2])}")
                        lines.append(f"{name}_sum{_fmt(labels)} {_num(series[-1])}")
        for name, (text, series_map) in sorted((gauges or {}).items()):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            for labels, v in sorted(series_map.items()):
                lines.append(f"{name}{_fmt(labels)} {_num(v)}")
        return "\n".join(lines) + "\n"
