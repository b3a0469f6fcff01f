"""The pool's few-row linear against F.linear: odd sizes, many blocks, one and two threads, two
callers at once, PackedLinear's fallback to oneDNN where the pool is unavailable, and a real
process that uses the pool, forks, idles and exits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_linear_pool as pool
from engine import cpu_pool
from engine.packed_linear import PackedLinear, can_pack
from tests.helpers.pool_threads import pool_size_restored

pytestmark = pytest.mark.skipif(not pool.available(),
                                reason=f"no CPU linear pool: {pool.unavailable_reason()}")

ROOT = Path(__file__).resolve().parents[2]


def _case(rows: int, fan_in: int, fan_out: int, bias: bool,
          seed: int = 0) -> tuple[torch.Tensor, nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5)
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(fan_out, generator=gen))
    return torch.randn(rows, fan_in, generator=gen), linear


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("fan_in", "fan_out"), [
    (576, 960),    # SmolLM2's QKV: whole blocks
    (1536, 576),   # its down projection
    (37, 100),     # in not a multiple of the vector width, a part block at the end
    (8, 5000),     # many blocks, more than the threads
])
def test_matches_f_linear(pool_threads: int, bias: bool, fan_in: int, fan_out: int) -> None:
    for rows in (1, 2, 3, 5, 6, 7, 13, 16, pool.MAX_ROWS):
        x, linear = _case(rows, fan_in, fan_out, bias, seed=rows)
        weight = pool.pack(linear.weight, linear.bias)
        got = pool.linear(x, weight)
        assert got.shape == (rows, fan_out)
        torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias).detach(),
                                   atol=1e-5, rtol=1e-5)


def test_result_does_not_depend_on_threads() -> None:
    """Each output is one thread's sum in a fixed order: bit-identical on 1 and 2 threads."""
    x, linear = _case(9, 576, 3072, bias=True)
    weight = pool.pack(linear.weight, linear.bias)
    with pool_size_restored():
        cpu_pool.set_threads(1)
        one = pool.linear(x, weight)
        cpu_pool.set_threads(2)
        assert cpu_pool.threads() == 2
        assert torch.equal(pool.linear(x, weight), one)


def test_a_sleeping_helper_is_woken_and_helps() -> None:
    """Past its spin window the helper sleeps; the next job wakes it and it takes blocks. (A
    helper never woken would leave every block to the caller: right results, one core.)"""
    x, linear = _case(2, 576, 49152, bias=False)
    weight = pool.pack(linear.weight, None)
    with pool_size_restored():
        cpu_pool.set_threads(2)
        helped = cpu_pool.helped_blocks()
        deadline = time.monotonic() + 10  # a busy machine may keep the helper off its core
        while cpu_pool.helped_blocks() == helped and time.monotonic() < deadline:
            time.sleep(0.02)  # asleep again before each job
            pool.linear(x, weight)
        assert cpu_pool.helped_blocks() > helped
        cpu_pool.set_threads(1)
        helped = cpu_pool.helped_blocks()
        pool.linear(x, weight)
        assert cpu_pool.helped_blocks() == helped  # no helper: the caller alone


def test_two_callers_at_once(pool_threads: int) -> None:
    """A second caller while a job runs computes alone; both get their own right answers."""
    cases = [_case(4, 576, 3072, bias=b, seed=s) for s, b in ((1, False), (2, True))]
    weights = [pool.pack(linear.weight, linear.bias) for _, linear in cases]
    wants = [F.linear(x, linear.weight, linear.bias).detach() for x, linear in cases]
    bad: list[int] = []

    def run(i: int) -> None:
        for _ in range(40):
            if not torch.allclose(pool.linear(cases[i][0], weights[i]), wants[i], atol=1e-5,
                                  rtol=1e-5):
                bad.append(i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert bad == []


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
def test_packed_linear_takes_the_pool_up_to_max_rows() -> None:
    x, linear = _case(pool.MAX_ROWS + 1, 576, 960, bias=True)
    packed = PackedLinear(linear)
    assert packed.few_rows is not None
    for rows in (1, pool.MAX_ROWS):
        assert torch.equal(packed(x[:rows]), pool.linear(x[:rows], packed.few_rows))
    onednn = torch.ops.mkldnn._linear_pointwise(x, packed.weight_packed, packed.bias, "none",
                                                [], "")
    assert torch.equal(packed(x), onednn)  # more rows: oneDNN
    assert PackedLinear(linear, few_rows=False).few_rows is None


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
@pytest.mark.parametrize("how", ["no-compiler", "switched-off"])
def test_fallback_to_onednn_where_unavailable(how: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool._kernel, "lib", None)
    monkeypatch.setattr(pool._kernel, "reason", None)
    if how == "no-compiler":
        monkeypatch.setenv("PANTRY_KERNEL_CACHE", str(tmp_path))  # nothing built there
        monkeypatch.setenv("CC", "/nonexistent/cc")
    else:
        monkeypatch.setenv("PANTRY_CPU_LINEAR_POOL", "0")
    assert not pool.available()
    reason = pool.unavailable_reason()
    assert reason is not None and ("/nonexistent/cc" in reason if how == "no-compiler"
                                   else reason == "PANTRY_CPU_LINEAR_POOL=0")
    x, linear = _case(3, 37, 100, bias=True)
    packed = PackedLinear(linear)
    assert packed.few_rows is None
    onednn = torch.ops.mkldnn._linear_pointwise(x, packed.weight_packed, packed.bias, "none",
                                                [], "")
    assert torch.equal(packed(x), onednn)


def test_a_process_using_the_pool_forks_idles_and_exits() -> None:
    """In a real process: after the spin window the helper sleeps (the idle process uses no
    CPU), a forked child computes on its caller alone, and the process exits at once."""
    script = textwrap.dedent("""
        import os, sys, time, torch
        from engine import cpu_linear_pool as pool, cpu_pool
        assert pool.available()
        cpu_pool.set_threads(2)
        w = torch.randn(3072, 576)
        x = torch.randn(4, 576)
        packed = pool.pack(w, None)
        want = x @ w.t()
        assert torch.allclose(pool.linear(x, packed), want, atol=1e-4)
        time.sleep(0.1)  # past the spin window
        cpu = time.process_time()
        time.sleep(0.5)
        print("idle-cpu", time.process_time() - cpu)
        pid = os.fork()
        if pid == 0:
            ok = torch.allclose(pool.linear(x, packed), want, atol=1e-4)
            os._exit(0 if ok else 3)
        assert os.waitpid(pid, 0)[1] == 0
        print("forked-ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[1] == "forked-ok"
    assert lines[0].startswith("idle-cpu ")
    assert float(lines[0].split()[1]) < 0.05  # asleep: 0.5 s spinning would be ~0.5 s of CPU


def test_a_model_loaded_without_few_rows_keeps_no_pool_copy(tiny_llama: Path) -> None:
    """What prefill engines load: every linear on oneDNN alone, and the same greedy logits."""
    from engine.loader import load_model
    from engine.runner import ModelRunner, SeqStep

    plain = load_model(tiny_llama, few_rows=False)
    linears = [m for m in plain.model.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.few_rows is None for m in linears)
    full = load_model(tiny_llama)
    assert all(m.few_rows is not None for m in full.model.modules()
               if isinstance(m, PackedLinear)) == pool.available()
    logits = [ModelRunner(m, num_blocks=4).step([SeqStep(tuple(range(3, 40)), 0, (0, 1, 2))])
              for m in (plain, full)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
