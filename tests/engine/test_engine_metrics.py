"""An engine's /metrics over real HTTP: in-process, and from a real prefill and decode process
that announces the URL in its ready file. Plus the role config the CLI flags are built from."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from decode.config import DecodeLimits
from engine.role_config import EngineRoleConfig
from engine.role_core import EngineCore
from engine.role_server import start_metrics
from pantry.common.config_flags import MIB, add_config_flags, config_from_args
from pantry.common.errors import ConfigError
from pantry.common.sampling import SamplingParams
from pantry.common.wire import sampling_to_proto
from pantry.v1 import engine_pb2, engine_pb2_grpc
from prefill.engine import PrefillEngine, PrefillJob
from tests.decode.engine_rig import KV_CACHE_BYTES, block_object_bytes, make_core, prompt

REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 128  # KV_CACHE_BYTES of the tiny llama

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: Samples, name: str, role: str, engine_id: str) -> float:
    return samples[(name, frozenset({("role", role), ("engine_id", engine_id)}))]


# ---- in-process -----------------------------------------------------------------------------

@pytest.fixture
def core(tiny_llama: Path, pool_address: str) -> Iterator[EngineCore]:
    core = make_core(tiny_llama, pool_address, "prefill", "prefill-m")
    yield core
    core.close()


def test_metrics_server_serves_the_core_registry_until_closed(core: EngineCore) -> None:
    PrefillEngine(core).prefill(
        PrefillJob("r", prompt(40, seed=1), "", SamplingParams(temperature=0.0, max_tokens=4)))
    core.flush_writes()  # prefill answers before its blocks are written
    server = start_metrics(core)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        got = scrape(server.url)
    finally:
        server.close()

    def value(name: str) -> float:
        return series(got, name, "prefill", "prefill-m")

    assert value("pantry_engine_requests_total") == 1
    assert value("pantry_engine_computed_tokens_total") == 40
    assert value("pantry_engine_pool_tokens_total") == 0
    assert value("pantry_engine_busy_seconds_total") == core.counters().busy_seconds_total
    assert value("pantry_engine_time_to_first_token_seconds_count") == 1
    assert value("pantry_engine_time_between_tokens_seconds_count") == 0
    # A 40-token prompt is one pass; its time is the busy time, some of it perhaps off the CPU.
    assert value("pantry_engine_step_seconds_count") == 1
    assert value("pantry_engine_step_seconds_sum") == value("pantry_engine_busy_seconds_total")
    assert 0 <= value("pantry_engine_loop_wait_seconds_total") <= value(
        "pantry_engine_busy_seconds_total")
    assert value("pantry_engine_waiting_requests") == 0
    assert value("pantry_engine_running_requests") == 0
    assert value("pantry_engine_kv_free_blocks") == NUM_BLOCKS
    assert value("pantry_engine_kv_blocks") == NUM_BLOCKS
    # The prompt's two full blocks stay indexed (and free) for the next prompt sharing them.
    assert value("pantry_engine_kv_cached_blocks") == 2
    assert value("pantry_engine_local_hit_blocks_total") == 0
    assert value("pantry_pool_client_blocks_missed_total") == 2
    # Both full blocks and the 8-token tail (under its tail key, for decode; never indexed).
    assert value("pantry_pool_client_blocks_stored_total") == 3
    assert value("pantry_pool_client_written_bytes_total") == 3 * block_object_bytes(core)
    assert value("pantry_engine_prompt_tails_stored_total") == 1
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_busy_counts_the_loop_off_its_cpu_and_only_iterations_that_computed(
        core: EngineCore) -> None:
    def value(name: str) -> float:
        return core.metrics.registry.get_sample_value(
            name, {"role": "prefill", "engine_id": "prefill-m"}) or 0.0

    with core.busy():
        time.sleep(0.05)  # off the CPU for all of it: as a loop waiting for the GIL would be
    waited = value("pantry_engine_loop_wait_seconds_total")
    assert value("pantry_engine_busy_seconds_total") >= 0.05
    # The thread's own CPU time in there is microseconds.
    assert 0.04 <= waited <= value("pantry_engine_busy_seconds_total")
    assert value("pantry_engine_step_seconds_count") == 1
    with core.busy() as iteration:
        iteration.computed = False  # nothing to compute: busy time, but not a step
    assert value("pantry_engine_step_seconds_count") == 1
    assert value("pantry_engine_busy_seconds_total") > value("pantry_engine_step_seconds_sum")


def test_far_helper_blocks_are_read_at_each_scrape(core: EngineCore) -> None:
    computed = [0]
    core.metrics.watch_far_helpers(lambda: computed[0])

    def value() -> float | None:
        return core.metrics.registry.get_sample_value(
            "pantry_engine_far_helper_blocks_total", {"role": "prefill", "engine_id": "prefill-m"})

    assert value() == 0
    computed[0] = 7
    assert value() == 7


# ---- a real role process --------------------------------------------------------------------

ROLE_MAIN = """
import sys
from engine.role_config import EngineRoleConfig
role, model, master, ready = sys.argv[1:5]
config = EngineRoleConfig(model=model, kv_master=master, engine_id=role + "-p", block_size=16,
                          kv_cache_bytes=int(sys.argv[5]), threads=1, ready_file=ready)
if role == "prefill":
    from prefill.config import PrefillLimits
    from prefill.service import run
    sys.exit(run(config, PrefillLimits()))
from decode.config import DecodeLimits
from decode.service import run
sys.exit(run(config, DecodeLimits()))
"""


def wait_ready(proc: subprocess.Popen[bytes], ready: Path) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, f"role process exited with {proc.returncode}"
        assert time.monotonic() < deadline, "role process never wrote its ready file"
        time.sleep(0.1)
    info: dict[str, object] = json.loads(ready.read_text())
    return info


@pytest.mark.slow
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_role_process_announces_and_serves_its_metrics(
    role: str, tiny_llama: Path, pool_address: str, tmp_path: Path
) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", ROLE_MAIN, role, str(tiny_llama), pool_address, str(ready),
         str(KV_CACHE_BYTES)], cwd=REPO, env=env)
    try:
        info = wait_ready(proc, ready)
        assert sorted(info) == ["address", "metrics", "pid"]
        assert info["pid"] == proc.pid
        metrics_url = str(info["metrics"])
        assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics")

        before = scrape(metrics_url)
        assert series(before, "pantry_engine_requests_total", role, f"{role}-p") == 0
        assert series(before, "pantry_engine_kv_blocks", role, f"{role}-p") == NUM_BLOCKS

        ids = prompt(40, seed=2)
        sampling = sampling_to_proto(
            SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        with grpc.insecure_channel(str(info["address"])) as channel:
            if role == "prefill":
                engine_pb2_grpc.PrefillEngineStub(channel).Prefill(
                    engine_pb2.PrefillRequest(token_ids=ids, sampling=sampling), timeout=60)
                between = 0
            else:
                chunks = list(engine_pb2_grpc.DecodeEngineStub(channel).Decode(
                    engine_pb2.DecodeRequest(token_ids=ids, sampling=sampling), timeout=60))
                assert sum(len(c.token_ids) for c in chunks) == 5
                between = 4

        after = scrape(metrics_url)

        def value(name: str) -> float:
            return series(after, name, role, f"{role}-p")

        assert value("pantry_engine_requests_total") == 1
        assert value("pantry_engine_computed_tokens_total") == 40
        assert value("pantry_engine_time_to_first_token_seconds_count") == 1
        assert value("pantry_engine_time_between_tokens_seconds_count") == between
        assert value("pantry_pool_client_blocks_missed_total") == 2
        # The pool client's own series are on the engine's scrape too: nothing refused.
        assert after[("pantry_kv_client_objects_rejected_total",
                      frozenset({("reason", "key")}))] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


# ---- the config the CLI flags are built from -------------------------------------------------

@pytest.mark.parametrize("cls", [EngineRoleConfig, DecodeLimits])
def test_every_config_field_has_help(cls: type) -> None:
    assert [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")] == []


def test_engine_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, EngineRoleConfig)
    ns = parser.parse_args(["--model", "m", "--kv-master", "h:1", "--engine-id", "e",
                            "--kv-cache-bytes", "2MiB", "--cpus", "0,1",
                            "--metrics-port", "9100"])
    assert config_from_args(EngineRoleConfig, ns) == EngineRoleConfig(
        model="m", kv_master="h:1", engine_id="e", kv_cache_bytes=2 * MIB, cpus=(0, 1),
        metrics_port=9100)

    limits = argparse.ArgumentParser()
    add_config_flags(limits, DecodeLimits)
    assert config_from_args(DecodeLimits, limits.parse_args(["--max-running", "4"])) == \
        DecodeLimits(max_running=4)


@pytest.mark.parametrize("port", [-1, 65536])
def test_metrics_port_must_be_a_tcp_port(port: int) -> None:
    with pytest.raises(ConfigError, match="^metrics_port: "):
        EngineRoleConfig(model="m", kv_master="h:1", engine_id="e", metrics_port=port)
