"""`pantry replay TRACE --simulate`: a Mooncake-format trace through the placement code against a
cost model of a GPU cluster, per policy, plus the pool's eviction table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from conductor.cost_model import ClusterSpec
from conductor.placement import POLICY_NAMES, Slo
from conductor.simulator import PolicyResult, simulate
from conductor.trace import TraceRequest, read_trace
from kvstore.eviction import POLICIES as EVICTION_POLICIES
from kvstore.eviction import belady_hit_rate, hit_rate, make_policy
from pantry.common.config_flags import add_config_flags, config_from_args
from pantry.common.errors import ConfigError


@dataclass(frozen=True)
class ReplayOptions:
    trace: str = field(metadata={"help": "the trace: JSON lines with timestamp (ms), "
                                         "input_length, output_length, hash_ids"})
    simulate: bool = field(default=False, metadata={"help": "replay against the cost model"})
    live: bool = field(default=False, metadata={
        "help": "send the trace to a running Pantry at --url and measure"})
    url: str = field(default="http://127.0.0.1:8000", metadata={
        "help": "--live: the Pantry's OpenAI HTTP API"})
    time_scale: float = field(default=1.0, metadata={
        "help": "multiply the trace's arrival times by this (below 1: a heavier load)"})
    length_scale: float = field(default=1.0, metadata={
        "help": "multiply prompt and output lengths (and the 512-token blocks) by this"})
    calibrate_from: str = field(default="", metadata={
        "help": "--simulate: measure the engines' costs on the idle Pantry at this URL "
                "(its OpenAI HTTP API) instead of computing them from the cluster flags"})
    vocab_size: int = field(default=512, metadata={
        "help": "--live: token ids are drawn below this (the served model's vocabulary)"})
    policies: str = field(default=",".join(POLICY_NAMES), metadata={
        "help": "placement policies to compare, comma-separated"})
    eviction: str = field(default="reuse", metadata={
        "help": f"the pool's eviction policy: {', '.join(sorted(EVICTION_POLICIES))}"})
    capacities: str = field(default="1000,10000,30000,50000,100000", metadata={
        "help": "pool capacities of the eviction table, in blocks, comma-separated"})
    limit: int = field(default=0, metadata={"help": "replay only the first N requests (0 = all)"})
    early_reject: bool = field(default=False, metadata={
        "help": "refuse requests predicted to miss an SLO (else only count attainment)"})
    seed: int = field(default=0, metadata={"help": "seed of the random policy"})
    json: bool = field(default=False, metadata={"help": "print one JSON object, nothing else"})
    plot: str = field(default="", metadata={"help": "draw the tables into this PNG"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (stderr)"})

    def __post_init__(self) -> None:
        for name in self.policy_names:
            if name not in POLICY_NAMES:
                raise ConfigError(f"policies: unknown {name!r}; use {', '.join(POLICY_NAMES)}")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction: unknown {self.eviction!r}; use "
                              f"{', '.join(sorted(EVICTION_POLICIES))}")
        try:
            caps = self.capacity_list
        except ValueError:
            raise ConfigError(f"capacities: {self.capacities!r} is not a list of "
                              "block counts") from None
        if not caps or min(caps) < 1:
            raise ConfigError("capacities: give at least one capacity of 1 block or more")
        if self.limit < 0:
            raise ConfigError("limit: must be 0 (all) or positive")
        if self.simulate == self.live:
            raise ConfigError("replay: give exactly one of --simulate and --live")
        if self.time_scale <= 0 or self.length_scale <= 0:
            raise ConfigError("time_scale, length_scale: must be positive")
        if self.calibrate_from and not self.simulate:
            raise ConfigError("calibrate_from: only with --simulate")
        if self.vocab_size < 4:
            raise ConfigError("vocab_size: must be at least 4")

    @property
    def policy_names(self) -> list[str]:
        return [p.strip() for p in self.policies.split(",") if p.strip()]

    @property
    def capacity_list(self) -> list[int]:
        return [int(c) for c in self.capacities.split(",") if c.strip()]


def add_replay_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help=ReplayOptions.__dataclass_fields__["trace"].metadata["help"])
    add_config_flags(parser, ReplayOptions, skip=("trace",))
    add_config_flags(parser.add_argument_group("cluster (cost model)"), ClusterSpec)


@dataclass(frozen=True)
class EvictionTable:
    capacity_blocks: list[int]
    lru: list[float]
    policy: list[float]
    belady: list[float]


def eviction_table(trace: Sequence[TraceRequest], capacities: Sequence[int],
                   eviction: str) -> EvictionTable:
    prompts = [r.hash_ids for r in trace]
    return EvictionTable(
        list(capacities),
        [hit_rate(make_policy("lru"), prompts, c) for c in capacities],
        [hit_rate(make_policy(eviction), prompts, c) for c in capacities],
        [belady_hit_rate(prompts, c) for c in capacities])


def report(results: Sequence[PolicyResult], table: EvictionTable) -> dict[str, Any]:
    """The object `--json` prints."""
    return {
        "policies": {r.name: {
            "ttft_mean_s": r.ttft_mean_s, "ttft_p50_s": r.ttft(50), "ttft_p90_s": r.ttft(90),
            "ttft_p99_s": r.ttft(99), "tbt_p99_s": r.tbt_p99_s, "hit_rate": r.hit_rate,
            "slo_attainment": r.slo_attainment, "rejected": r.rejected}
            for r in results},
        "eviction": {"capacity_blocks": table.capacity_blocks, "lru": table.lru,
                     "policy": table.policy, "belady": table.belady},
    }


def format_tables(results: Sequence[PolicyResult], table: EvictionTable, eviction: str) -> str:
    lines = [f"{'policy':<12} {'hit':>6} {'ttft mean':>10} {'p50':>8} {'p90':>8} {'p99':>8} "
             f"{'tbt p99':>8} {'slo':>6} {'goodput':>8} {'rejected':>8}"]
    for r in results:
        lines.append(
            f"{r.name:<12} {r.hit_rate:>6.3f} {r.ttft_mean_s:>9.2f}s {r.ttft(50):>7.2f}s "
            f"{r.ttft(90):>7.2f}s {r.ttft(99):>7.2f}s {r.tbt_p99_s * 1000:>6.1f}ms "
            f"{r.slo_attainment:>6.3f} {r.goodput_rps:>6.2f}/s {r.rejected:>8}")
    lines += ["", f"{'blocks':>8} {'lru':>7} {eviction:>7} {'belady':>7}"]
    for i, cap in enumerate(table.capacity_blocks):
        lines.append(f"{cap:>8} {table.lru[i]:>7.3f} {table.policy[i]:>7.3f} "
                     f"{table.belady[i]:>7.3f}")
    return "\n".join(lines)


def plot(path: str, results: Sequence[PolicyResult], table: EvictionTable,
         eviction: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in results]
    left.bar(names, [r.ttft_mean_s for r in results], label="mean")
    left.plot(names, [r.ttft(90) for r in results], "k^", label="p90")
    left.set_ylabel("TTFT (s)")
    left.set_title("TTFT by placement policy")
    left.legend()
    for label, values in (("LRU", table.lru), (eviction, table.policy),
                          ("Belady", table.belady)):
        right.plot(table.capacity_blocks, values, marker="o", label=label)
    right.set_xscale("log")
    right.set_xlabel("pool capacity (blocks)")
    right.set_ylabel("block hit rate")
    right.set_title("Eviction")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scale_trace(trace: Sequence[TraceRequest], spec: ClusterSpec, time_scale: float,
                length_scale: float) -> tuple[list[TraceRequest], ClusterSpec]:
    """The trace as `--live` sends it: arrival times times `time_scale` (below 1 loads the
    cluster more heavily than the trace's own rate, as Mooncake's experiments do), prompt and
    output lengths and the block size times `length_scale` (as many blocks per prompt)."""
    if time_scale == 1 and length_scale == 1:
        return list(trace), spec
    scaled = [replace(r, timestamp_ms=round(r.timestamp_ms * time_scale),
                      input_length=max(round(r.input_length * length_scale), 1),
                      output_length=max(round(r.output_length * length_scale), 1))
              for r in trace]
    blocks = max(round(spec.block_tokens * length_scale), 1)
    return scaled, replace(spec, block_tokens=blocks)


def run_replay(ns: argparse.Namespace) -> int:
    options = config_from_args(ReplayOptions, ns)
    spec = config_from_args(ClusterSpec, ns)
    trace = read_trace(options.trace, options.limit)
    if not trace:
        raise ConfigError(f"trace: {options.trace} has no requests")
    if options.live:
        from pantry.cli.live_replay import replay_live

        bar = _progress(options, len(trace))
        results = [replay_live(trace, options, Slo(spec.ttft_slo_s, spec.tbt_slo_s),
                               progress=bar.update if bar else None)]
    else:
        names = options.policy_names
        bar = _progress(options, len(trace) * len(names))
        arrivals, spec = scale_trace(trace, spec, options.time_scale, options.length_scale)
        models = None
        if options.calibrate_from:
            from pantry.cli.live_replay import probe_calibration

            models = probe_calibration(options.calibrate_from, spec.block_tokens,
                                       options.vocab_size)
            print(f"calibrated: {models}", file=sys.stderr)
        results = []
        for name in names:
            results.append(simulate(arrivals, spec, name, options.eviction, options.early_reject,
                                    options.seed, progress=bar.update if bar else None,
                                    models=models))
    if bar:
        bar.close()
    table = eviction_table(trace, options.capacity_list, options.eviction)
    if options.json:
        print(json.dumps(report(results, table)))
    else:
        print(format_tables(results, table, options.eviction))
    if options.plot:
        plot(options.plot, results, table, options.eviction)
    return 0


def _progress(options: ReplayOptions, total: int) -> Any:
    if not options.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, desc="replay")
