"""The simulator builds the cluster each policy assumes: the baselines reuse only their own
engine's cache, `pantry` reads the whole pool at the transfer tier's cost."""

from __future__ import annotations

import pytest

from conductor.cost_model import ClusterSpec
from conductor.simulator import Simulation
from conductor.trace import TraceRequest

SPEC = ClusterSpec(prefill_engines=2, decode_engines=1, pool_blocks=100)
# r1 leaves blocks 1, 2 on prefill-0; r2 (100 blocks) then keeps one engine busy for seconds
# while r3, which extends r1's prefix, arrives.
TRACE = [TraceRequest(0, 1024, 10, (1, 2)),
         TraceRequest(100_000, 51200, 10, tuple(range(100, 200))),
         TraceRequest(100_001, 1536, 10, (1, 2, 3))]


def run(policy: str) -> tuple[Simulation, list[tuple[int, float]]]:
    sim = Simulation(SPEC, policy)
    outcomes = [sim.step(r) for r in TRACE]
    sim.finish()
    return sim, [(o.reused_blocks, o.ttft_s) for o in outcomes]


def held(sim: Simulation, block: int) -> list[str]:
    return [e for e, c in sim.caches.items() if block in c.policy]


def test_local_reach_reuses_only_the_engines_own_cache() -> None:
    model = SPEC.prefill_model()
    # load: r2 to the idle prefill-0, so r3 goes to prefill-1, which holds nothing of it.
    sim, got = run("load")
    assert [reused for reused, _ in got] == [0, 0, 0]
    assert got[2][1] == pytest.approx(model.predict(1536, 0))
    assert held(sim, 1) == ["prefill-0", "prefill-1"]  # each engine keeps its own copy
    # round_robin sends r3 back to prefill-0 by chance: its own cache has the prefix.
    _, got = run("round_robin")
    assert [reused for reused, _ in got] == [0, 0, 2]
    # cache (local cache-aware) weighs prefill-0's 2 local blocks against its queue: prefill-1.
    sim, got = run("cache")
    assert [reused for reused, _ in got] == [0, 0, 0]
    assert held(sim, 3) == ["prefill-1"]


def test_pool_reach_reads_another_hosts_blocks_at_the_remote_cost() -> None:
    model, transfer = SPEC.prefill_model(), SPEC.transfer_model()
    sim, got = run("pantry")
    assert [reused for reused, _ in got] == [0, 0, 2]
    # r3 on the idle prefill-1: computes block 3 only, pulls blocks 1 and 2 from prefill-0.
    assert got[2][1] == pytest.approx(model.predict(512, 1024) + 2 * transfer.seconds("remote"))
    # The pool stores a key once: blocks 1 and 2 stay on prefill-0, block 3 lands on prefill-1.
    assert held(sim, 1) == ["prefill-0"]
    assert held(sim, 3) == ["prefill-1"]
