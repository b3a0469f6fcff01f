"""engine.cpu_split: the shared board, and an engine moving its own threads by it. The moves
run in a child process, so this one's CPUs and thread pools stay as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.cpu_split import CpuBoard, CpuBoardError
from engine.loader import load_model
from engine.role_config import EngineRoleConfig
from engine.runner import ModelRunner, SeqStep
from pantry.common.errors import ConfigError


def test_board_reports_only_the_other_roles_engines(tmp_path: Path) -> None:
    path = tmp_path / "board"
    CpuBoard.create(path, ["prefill", "decode", "decode"])
    prefill, decode0, decode1 = (CpuBoard(path, slot) for slot in range(3))
    assert (prefill.engines, decode0.slot) == (3, 1)
    assert [b.other_role_computing() for b in (prefill, decode0, decode1)] == [False] * 3
    decode1.set_computing(True)
    # A decode engine computing says nothing to the other decode engine.
    assert [b.other_role_computing() for b in (prefill, decode0, decode1)] == [True, False, False]
    prefill.set_computing(True)
    assert [b.other_role_computing() for b in (prefill, decode0, decode1)] == [True, True, True]
    decode1.set_computing(False)
    assert [b.other_role_computing() for b in (prefill, decode0, decode1)] == [False, True, True]
    prefill.set_computing(False)
    assert [b.other_role_computing() for b in (prefill, decode0, decode1)] == [False] * 3
    assert path.read_bytes() == b"PCPU\x03pdd\x00\x00\x00"
    for board in (prefill, decode0, decode1):
        board.close()


def test_board_errors_name_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "board"
    with pytest.raises(CpuBoardError, match="No such file"):
        CpuBoard(path, 0)
    path.write_bytes(b"something else")
    with pytest.raises(CpuBoardError, match="not a board"):
        CpuBoard(path, 0)
    CpuBoard.create(path, ["prefill", "decode"])
    with pytest.raises(CpuBoardError, match="has 2 slots; no slot 2"):
        CpuBoard(path, 2)


CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from engine.cpu_split import AdaptiveCpus, CpuBoard, far_helpers, thread_ids

    path, own, every = sys.argv[1], {int(sys.argv[2])}, sorted(os.sched_getaffinity(0))
    CpuBoard.create(path, ["prefill", "decode"])
    prefill = CpuBoard(path, 0)
    sizes = []
    far = []  # the C pool's far helpers now running

    def set_far(count):
        far[:] = far_helpers(count)
        return far

    split = AdaptiveCpus(CpuBoard(path, 1), own=own, every=every, set_threads=sizes.append,
                         background_away=True, set_far=set_far)
    done = threading.Event()
    # Stands for the puller, the writer, the servers.
    puller = threading.Thread(target=done.wait, daemon=True)
    puller.start()
    # A thread that is not Python's, as OpenMP's and the C pool's are: one of torch's.
    import torch
    torch.set_num_threads(len(every))
    torch.ones(1 << 22).sum()

    def state():
        loop = threading.get_native_id()
        others = {"every" if os.sched_getaffinity(t) == set(every) else
                  str(sorted(os.sched_getaffinity(t))) for t in thread_ids()
                  if t not in (loop, puller.native_id, *far)}
        return {"loop": sorted(os.sched_getaffinity(loop)),
                "far": [sorted(os.sched_getaffinity(t)) for t in far],
                "puller": sorted(os.sched_getaffinity(puller.native_id)),
                "not_python": sorted(others), "sizes": list(sizes),
                "confined": split.confined, "switches": split.switches,
                "board": list(open(path, "rb").read())}

    out = []
    split.poll(True)        # alone: every CPU
    out.append(state())
    prefill.set_computing(True)
    split.poll(True)        # prefill computes: decode on its own CPU, the rest away
    out.append(state())
    split.poll(False)       # idle: says so, moves nothing
    out.append(state())
    prefill.set_computing(False)
    split.poll(True)        # alone again
    out.append(state())
    done.set()
    print(json.dumps(out))
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_engine_moves_its_threads_when_the_other_role_computes(tmp_path: Path) -> None:
    every = sorted(os.sched_getaffinity(0))
    own, away = every[-1], every[:-1]
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "board"), str(own)],
                         capture_output=True, text=True, check=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    alone, confined, idle, again = json.loads(out.stdout)
    board = [*b"PCPU", 2, ord("p"), ord("d")]
    assert alone == {"loop": every, "far": [], "puller": every, "not_python": ["every"],
                     "sizes": [len(every)], "confined": False, "switches": 0,
                     "board": [*board, 0, 1]}
    # One far helper per CPU decode is not given, on those CPUs.
    assert confined == {"loop": [own], "far": [away] * len(away), "puller": away,
                        "not_python": [str([own])],
                        "sizes": [len(every), 1], "confined": True, "switches": 1,
                        "board": [*board, 1, 1]}
    assert idle == {**confined, "board": [*board, 1, 0]}
    assert again == {**alone, "sizes": [len(every), 1, len(every)], "switches": 2,
                     "board": [*board, 0, 1]}


def test_between_layers_runs_after_each_layer_but_the_last(
        tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["llama"])
    runner = ModelRunner(loaded, num_blocks=8, block_size=4)
    steps = [SeqStep(tuple(range(1, 10)), 0, (0, 1, 2))]
    plain = runner.step(steps)
    calls: list[int] = []
    runner.model.between_layers = lambda: calls.append(1)
    hooked = runner.step(steps)
    assert len(calls) == loaded.config.num_layers - 1
    assert torch.equal(plain, hooked)


def test_a_board_without_cpus_is_refused() -> None:
    with pytest.raises(ConfigError, match="cpu_board: give the engine's own share"):
        EngineRoleConfig(model="smollm2", kv_master="localhost:1", engine_id="e",
                         cpu_board="/tmp/board")
    with pytest.raises(ConfigError, match="cpu_board_slot: -1 must be 0 or positive"):
        EngineRoleConfig(model="smollm2", kv_master="localhost:1", engine_id="e",
                         cpus=(0,), cpu_board="/tmp/board", cpu_board_slot=-1)
