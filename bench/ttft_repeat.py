"""TTFT of a repeated prompt on a SmolLM2-135M decode engine (float32, CPU), in one process over an
in-process kvstore (master + one node on loopback), three ways in the same run:

  cold   a fresh prompt: every token computed (engine A, which writes its blocks back)
  pulled the same prompt on engine B, which does not hold it: its blocks come from the pool
         (what every repeat cost before the engine-local prefix cache: the baseline)
  local  the same prompt on engine B again: its blocks are still in B's own prefix cache,
         neither pulled nor computed

    .venv/bin/python bench/ttft_repeat.py [--lengths 512 1024 2048] [--reps 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode.engine import DecodeEngine  # noqa: E402
from decode.sequence import DecodeJob  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.role_config import EngineRoleConfig  # noqa: E402
from engine.role_core import EngineCore  # noqa: E402
from kvstore.client import KVStoreClient  # noqa: E402
from kvstore.config import ClientConfig, MasterConfig, NodeConfig  # noqa: E402
from kvstore.master_service import start_master  # noqa: E402
from kvstore.node_service import start_node  # noqa: E402
from pantry.common.config_flags import MIB  # noqa: E402
from pantry.common.sampling import SamplingParams  # noqa: E402


def ttft(engine: DecodeEngine, ids: tuple[int, ...]) -> tuple[float, int]:
    """Seconds to the first token, driving the loop on this thread; and the cached tokens."""
    start = time.perf_counter()
    handle = engine.submit(DecodeJob("bench", ids, "", SamplingParams(
        temperature=0.0, max_tokens=1, ignore_eos=True)))
    while engine.load() != (0, 0):
        if not engine._iteration():
            engine._wait_for_pulls()
    events = list(handle.events(timeout=0))
    elapsed = time.perf_counter() - start
    engine.core.flush_writes()  # the write-back runs beside the loop: not part of the TTFT
    return elapsed, events[0].pool_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args()
    master = start_master(MasterConfig(port=0, max_object_bytes=4 * MIB))
    address = f"127.0.0.1:{master.port}"
    node = start_node(NodeConfig(master_address=address, node_id="bench-node",
                                 dram_bytes=1024 * MIB, host_id="bench", heartbeat_s=0.5,
                                 max_object_bytes=4 * MIB, prefault=False))
    loaded = load_model("smollm2")
    cores = []
    for name in ("a", "b"):
        config = EngineRoleConfig(model="smollm2", kv_master=address, engine_id=f"decode-{name}",
                                  kv_cache_bytes=512 * MIB, max_model_len=max(ns.lengths) + 16)
        client = KVStoreClient(address, host_id="bench",
                               config=ClientConfig(max_object_bytes=4 * MIB))
        cores.append(EngineCore(config, "decode", loaded, client))
    a, b = (DecodeEngine(core, background=False) for core in cores)
    time.sleep(1.0)  # the node's first heartbeat registers it
    rng = random.Random(time.time_ns())
    rows = []
    try:
        ttft(a, tuple(rng.randrange(1000, 40000) for _ in range(64)))  # warm-up
        for length in ns.lengths:
            cold, pulled, local = [], [], []
            for _ in range(ns.reps):
                ids = tuple(rng.randrange(1000, 40000) for _ in range(length))
                c, c_cached = ttft(a, ids)
                p, p_cached = ttft(b, ids)
                h, h_cached = ttft(b, ids)
                full = length // 16 * 16
                assert c_cached == 0, "a fresh prompt must not be cached"
                assert p_cached == h_cached == min(full, length - 1), (p_cached, h_cached)
                cold.append(c)
                pulled.append(p)
                local.append(h)
            rows.append((length, *(statistics.median(x) for x in (cold, pulled, local))))
            print(f"  {length} tokens done", flush=True)
    finally:
        for engine in (a, b):
            engine.stop()
            engine.core.close()
        node.stop(grace=0)
        master.stop(grace=0)
    print(f"\nTTFT of a repeated prompt, SmolLM2-135M decode engine, median of {ns.reps}")
    print(f"{'prompt':>7} {'cold ms':>9} {'pulled ms':>10} {'local ms':>9} {'local/pulled':>13}")
    for length, c, p, h in rows:
        print(f"{length:>7} {c * 1000:>9.1f} {p * 1000:>10.1f} {h * 1000:>9.1f} {h / p:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
