"""The step trace's accounting: the loop's own CPU time, and other threads' by name."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from engine.step_trace import StepTrace


def _burn(cpu_s: float) -> None:
    """Spin until this thread has used `cpu_s` of CPU (not wall) time."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_a_line_splits_the_loops_cpu_from_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path), "decode-7")
    burned, done = threading.Event(), threading.Event()

    def burner_work() -> None:  # alive past the step, as an engine's threads are
        _burn(0.03)
        burned.set()
        done.wait()

    mark = trace.begin()
    burner = threading.Thread(target=burner_work, name="burner")
    burner.start()
    _burn(0.02)
    burned.wait()
    trace.end(mark, sequences=3, tokens=5, positions=120, pulling=1, confined=True)
    mark = trace.begin()
    trace.end(mark, sequences=1, tokens=1, positions=9, pulling=0, confined=None)
    done.set()
    burner.join()
    trace.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["engine"] == "decode-7"
    assert (first["sequences"], first["tokens"], first["positions"], first["pulling"],
            first["confined"]) == (3, 5, 120, 1, True)
    assert first["cpu_ms"] >= 20.0
    assert first["wall_ms"] >= first["cpu_ms"] - 0.1
    assert first["runq_ms"] >= 0.0
    assert first["threads"][f"burner:{burner.native_id}"] >= 30.0
    assert f"MainThread:{threading.get_native_id()}" not in first["threads"]  # the loop itself
    # The burner's CPU was counted once: the next step starts from where the last ended.
    assert second["threads"] == {}
    assert second["confined"] is None
