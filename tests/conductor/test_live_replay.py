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
from pantry.cli.live_replay import trace_tokens
from pantry.cli.main import main
from tests.conductor.fakes import Rig, chunk, fake_decode, fake_prefill

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
