"""`pantry replay --live` against a conductor over fake engines, served over real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from conductor.http_api import create_app
from conductor.trace import TraceRequest
from pantry.cli.live_replay import (
    PROBE_BLOCKS,
    PROBE_ROUNDS,
    _reason,
    probe_calibration,
    trace_tokens,
)
from pantry.cli.main import main
from tests.conductor.fakes import BLOCK, Rig, chunk, fake_decode, fake_prefill

LINES = [{"timestamp": 0, "input_length": 1024, "output_length": 128, "hash_ids": [1, 2]},
         {"timestamp": 10, "input_length": 1536, "output_length": 128, "hash_ids": [1, 2, 3]}]


def test_trace_tokens_keep_prefix_sharing() -> None:
    a = trace_tokens(TraceRequest(0, 1024, 1, (1, 2)), 1 / 32, 64)
    b = trace_tokens(TraceRequest(0, 1500, 1, (1, 2, 3)), 1 / 32, 64)
    assert (len(a), len(b)) == (32, 47)
    assert b[:32] == a and b[32:] != a[:15]


@pytest.fixture
def served(pool_address: str) -> Iterator[tuple[str, Rig]]:
    decode = fake_decode("d0", chunk(7, 11), chunk(12, finish="length"))
    with Rig(pool_address, [fake_prefill("p0")], [decode]) as rig:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(create_app(rig.conductor))
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{port}", rig
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def test_live_replay_reports_what_it_measured(
        served: tuple[str, Rig], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, rig = served
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    rig.cache(trace_tokens(TraceRequest(0, 1024, 1, (1, 2)), 1 / 32, 64))
    assert main(["replay", str(trace), "--live", "--url", url, "--time-scale", "0.01",
                 "--length-scale", str(1 / 32), "--vocab-size", "64", "--capacities", "10",
                 "--no-progress", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["policies"]["live"]
    # The fakes report no pool tokens, so the hit rate is what they said: none.
    assert (got["rejected"], got["slo_attainment"], got["hit_rate"]) == (0, 1.0, 0.0)
    first = tuple(trace_tokens(TraceRequest(0, 1024, 1, (1, 2)), 1 / 32, 64))
    second = tuple(trace_tokens(TraceRequest(0, 1536, 1, (1, 2, 3)), 1 / 32, 64))
    # The first prompt's 2 blocks of 16 were in the pool: decode only. The second shares them
    # (same hash ids, same tokens) and adds a third block, so it is prefilled.
    assert [c.token_ids for c in rig.prefills[0].calls] == [second]
    assert sorted(c.token_ids for c in rig.decodes[0].calls) == sorted([first, second])
    assert second[:32] == first


def test_calibration_probes_cold_prompts_then_their_repeats(served: tuple[str, Rig]) -> None:
    url, rig = served
    c = probe_calibration(url, 4, 64)
    sent = [n for _ in range(PROBE_ROUNDS) for blocks in PROBE_BLOCKS
            for n in (4 * blocks + 1,) * 2]
    # Per round, 2, 4, 8, 16 and 24 blocks of 4 tokens plus one, each sent twice: the fakes
    # store nothing, so every repeat is prefilled again and prices no pool read. The 9-token
    # probes hold no full block of the fake engines' 16, so they go straight to decode.
    assert [len(call.token_ids) for call in rig.decodes[0].calls] == sent
    assert [len(call.token_ids) for call in rig.prefills[0].calls] == [
        n for n in sent if n >= BLOCK]
    assert PROBE_BLOCKS == (2, 4, 8, 16, 24) and PROBE_ROUNDS == 3
    assert c.transfer_per_block_s == 0.0
    # Each cold probe streams the fake's 2 chunks (3 tokens): its gaps are a decode step.
    assert c.decode_step_s > 0 and c.prefill_fixed_s >= 0 and c.prefill_per_token_s >= 0


def test_calibrate_from_needs_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(Path(__file__).parent / "data" / "conversation_head80.jsonl")
    assert main(["replay", trace, "--live", "--calibrate-from", "http://127.0.0.1:9"]) == 2
    assert "calibrate_from: only with --simulate" in capsys.readouterr().err


def test_simulate_calibrated_from_a_running_pantry(
        served: tuple[str, Rig], capsys: pytest.CaptureFixture[str]) -> None:
    url, rig = served
    trace = str(Path(__file__).parent / "data" / "conversation_head80.jsonl")
    assert main(["replay", trace, "--simulate", "--calibrate-from", url, "--policies", "pantry",
                 "--length-scale", str(1 / 128), "--vocab-size", "64", "--capacities", "10",
                 "--no-progress", "--json"]) == 0
    out = capsys.readouterr()
    assert "calibrated: Calibration(prefill_fixed_s=" in out.err
    # 512-token blocks at 1/128 are 4 tokens: the probes are 9 to 97 tokens, the 9-token ones
    # (no full 16-token block of the fakes) decoded directly; then the simulation ran on them.
    assert len(rig.prefills[0].calls) == 2 * 4 * PROBE_ROUNDS
    assert list(json.loads(out.out)["policies"]) == ["pantry"]


def test_a_stream_error_is_reported_by_what_it_says() -> None:
    assert _reason({"message": "busy", "type": "overloaded", "param": None, "code": 429}) == (
        "overloaded")
    assert _reason({"message": "engine p0 failed", "type": "unavailable", "code": 503}) == (
        "engine p0 failed")
    assert _reason({"type": "internal"}) == "internal"
    assert _reason("boom") == "boom"
