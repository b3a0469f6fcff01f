"""`pantry replay --simulate` on the first 80 requests of the conversation trace: the printed
JSON object and table, pinned (the simulation is deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pantry.cli.main import main

TRACE = str(Path(__file__).parent / "data" / "conversation_head80.jsonl")
ARGS = ["replay", TRACE, "--simulate", "--capacities", "10,100", "--prefill-engines", "2",
        "--decode-engines", "2", "--early-reject", "--ttft-slo", "20", "--no-progress",
        "--policies", "random,pantry"]


def test_replay_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {
        "policies": {
            "random": {"ttft_mean_s": pytest.approx(10.013543782237864),
                       "ttft_p50_s": pytest.approx(9.582837847403518),
                       "ttft_p90_s": pytest.approx(16.244322066969588),
                       "ttft_p99_s": pytest.approx(19.82425182658558),
                       "tbt_p99_s": pytest.approx(0.01712077312),
                       "hit_rate": pytest.approx(0.03359683794466403),
                       "slo_attainment": 0.975, "rejected": 2},
            "pantry": {"ttft_mean_s": pytest.approx(10.870252168737725),
                       "ttft_p50_s": pytest.approx(11.971238703032318),
                       "ttft_p90_s": pytest.approx(16.468802967838727),
                       "ttft_p99_s": pytest.approx(18.293691482342396),
                       "tbt_p99_s": pytest.approx(0.01680308928),
                       "hit_rate": pytest.approx(0.03458498023715415),
                       "slo_attainment": 1.0, "rejected": 0},
        },
        "eviction": {"capacity_blocks": [10, 100],
                     "lru": [pytest.approx(0.010869565217391304),
                             pytest.approx(0.038537549407114624)],
                     "policy": [pytest.approx(0.03903162055335968)] * 2,
                     "belady": [pytest.approx(0.03903162055335968)] * 2},
    }


def test_replay_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ARGS) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["policy", "hit", "ttft", "mean", "p50", "p90", "p99", "tbt",
                                "p99", "slo", "goodput", "rejected"]
    assert lines[1].split()[0] == "random" and lines[1].split()[-1] == "2"
    assert lines[-3:] == ["  blocks     lru   reuse  belady",
                          "      10   0.011   0.039   0.039",
                          "     100   0.039   0.039   0.039"]


def test_replay_refuses_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", TRACE, "--simulate", "--policies", "best"]) == 2
    assert "policies: unknown 'best'" in capsys.readouterr().err


def test_replay_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "replay.png"
    assert main([*ARGS, "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR: width and height of the 11 x 4 inch figure at matplotlib's default 100 dpi.
    assert int.from_bytes(data[16:20], "big") == 1100
    assert int.from_bytes(data[20:24], "big") == 400
