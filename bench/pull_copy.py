"""What moving a prompt's blocks through the pool costs a decode step beside it: the pool's
hashed copy (kvstore.hashed_copy: one GIL-free C call per node that hashes each block as it
copies it, with non-temporal stores) against the numpy copies and separate xxh3 passes it
replaces, in the same run, for both directions: a decode engine's pull, a prefill engine's
store.

A real master and storage node run as processes of their own and hold `--blocks` objects of
SmolLM2-135M's block size (737,280 bytes of KV). Each measurement is a child process (the
switch, PANTRY_HASHED_COPY, is read once a process), alternating between the two copies:
- two loops on one CPU, each timed alone and while a thread on the other CPU pulls every block
  with `read_into`, checked, as the engine's puller does, or stores as many under new keys
  with `put_many`, as a prefill engine does: one streams a 100 MB float32 matrix through
  matrix-vector products (a decode step's weights do not fit in any cache either), the other
  makes 300 short matrix products (a step's many GIL-releasing calls);
- a busy loop in another process on the pull's CPU (unless --idle), standing for the other
  role's compute there: a pull's thread that holds the GIL can then be preempted while the
  loop waits for it;
- the pull's and the store's own time, and a single-thread numpy memcpy of the same bytes
  (the baseline for the copy's speed).

    .venv/bin/python bench/pull_copy.py [--blocks 256] [--rounds 3] [--idle]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pool_throughput import spawn_kvstore, stop

from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig

HERE = Path(__file__).resolve()
LAYOUT = BlockLayout("pull-copy-bench", "float32", (30, 2, 16, 3, 64))
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
ARMS = {"hashed copy": "1", "numpy copy + check": "0"}
TRIALS = 5
# Removed objects keep their slots until their read lease lapses: short leases, fast reuse.
LEASE_MS = 200


def keys(n: int, first: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(first, first + n)]


def fill(client: KVStoreClient, n: int) -> None:
    rng = np.random.default_rng(0)
    ks = keys(n)
    for i in range(0, n, 16):
        stored = client.put_many([(k, rng.integers(0, 256, BLOCK_BYTES, dtype=np.uint8).tobytes())
                                  for k in ks[i:i + 16]], LAYOUT)
        if not all(stored):
            raise SystemExit(f"the node took {sum(stored)} of {len(stored)} blocks")
    if client.match_prefix(ks).matched != n:
        raise SystemExit("the node evicted blocks of the bench's: give it more room")


def child(master: str, n: int, busy: bool) -> dict[str, float]:
    """Runs with the switch set by the parent: each loop alone, beside a pull and beside a
    store, and the pull's and store's own times over every trial (ms)."""
    import torch  # only here: the pool's layers never load it, the loops stand for a step

    torch.set_num_threads(1)
    cpus = sorted(os.sched_getaffinity(0))
    loop_cpu, work_cpu = cpus[-1], cpus[0]
    client = KVStoreClient(master, config=ClientConfig(max_object_bytes=4 << 20))
    ks = keys(n)
    dst = np.zeros((n, BLOCK_BYTES), np.uint8)
    x, w = torch.randn(1, 4096), torch.randn(4096, 6144)
    a, b = torch.randn(64, 576), torch.randn(576, 576)

    def streaming() -> None:  # waits on DRAM, as a decode step's weights do
        for _ in range(16):
            torch.mm(x, w)

    def short_ops() -> None:  # many short GIL-releasing calls, as a step's layers make
        for _ in range(300):
            torch.mm(a, b)

    loops = {"streaming": streaming, "short ops": short_ops}

    def pull(out: list[float]) -> None:
        os.sched_setaffinity(0, {work_cpu})
        match = client.match_prefix(ks)
        start = time.perf_counter()
        got = client.read_into(match, [dst[i].data for i in range(n)], LAYOUT)
        out.append(time.perf_counter() - start)
        assert all(o is not None for o in got.objects), got.rejected

    stored = [0]

    def store(out: list[float]) -> None:
        os.sched_setaffinity(0, {work_cpu})
        stored[0] += 1
        fresh = keys(n, first=stored[0] * n)
        start = time.perf_counter()
        ok = client.put_many([(k, dst[i].data) for i, k in enumerate(fresh)], LAYOUT)
        out.append(time.perf_counter() - start)
        assert all(ok), "the node is out of room"
        client.remove(fresh)
        time.sleep(LEASE_MS / 1000 + 0.2)  # their slots come back once the leases lapse

    os.sched_setaffinity(0, {loop_cpu})
    for warm in (pull, store):
        warm([])
        os.sched_setaffinity(0, {loop_cpu})
    # The other role's compute on the pool's CPU: a thread that holds the GIL there can be
    # preempted, and the loop then waits for it.
    hog = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None)
    if hog is not None:
        os.sched_setaffinity(hog.pid, {work_cpu})
    out: dict[str, float] = {}
    took: dict[str, list[float]] = {"pull": [], "store": []}
    try:
        for loop_name, loop in loops.items():
            out[f"{loop_name}_alone"] = 1e3 * statistics.median(
                _timed(loop) for _ in range(TRIALS))
            for work_name, work in (("pull", pull), ("store", store)):
                beside: list[float] = []
                for _ in range(TRIALS):
                    th = threading.Thread(target=work, args=(took[work_name],))
                    th.start()
                    beside.append(_timed(loop))
                    th.join()
                out[f"{loop_name}_{work_name}"] = 1e3 * statistics.median(beside)
    finally:
        if hog is not None:
            hog.kill()
    for work_name, times in took.items():
        out[f"{work_name}_ms"] = 1e3 * statistics.median(times)
    src = np.random.default_rng(1).integers(0, 256, (n, BLOCK_BYTES), dtype=np.uint8)
    out["memcpy_ms"] = 1e3 * min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    client.close()
    return out


def _added(beside: float, alone: float) -> str:
    return f"{beside - alone:+8.1f} ({beside / alone:.2f}x)"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", action="store_true",
                    help="leave the pool's CPU idle (default: a busy loop there stands for the "
                         "other role's compute)")
    ap.add_argument("--child", metavar="MASTER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.blocks, busy=not args.idle)))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: the loop on one, the pull on another")
    tmp = Path(tempfile.mkdtemp(prefix="pull-copy-"))
    master, addr = spawn_kvstore(tmp, "master", "master", "--port", "0", "--lease-ms",
                                 str(LEASE_MS))
    node, _ = spawn_kvstore(tmp, "node", "node", "--master", addr, "--port", "0", "--node-id",
                            "n1", "--dram-bytes", str((2 * args.blocks + 64) << 20))
    try:
        client = KVStoreClient(addr, config=ClientConfig(max_object_bytes=4 << 20))
        deadline = time.monotonic() + 30
        while not client.status().nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        fill(client, args.blocks)
        client.close()
        runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
        for r in range(args.rounds):
            order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                env = {**os.environ, "PANTRY_HASHED_COPY": ARMS[arm]}
                cmd = [sys.executable, str(HERE), "--child", addr, "--blocks", str(args.blocks)]
                out = subprocess.run([*cmd, *(["--idle"] if args.idle else [])], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
                runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {arm}: {runs[arm][-1]}", file=sys.stderr)
    finally:
        stop(node, master)
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
           for arm, rs in runs.items()}
    print(f"\n{args.blocks} blocks ({args.blocks * BLOCK_BYTES / 1e6:.0f} MB) pulled or stored "
          f"on one CPU ({'idle' if args.idle else 'busy'} otherwise) beside a loop on the "
          f"other; medians of {args.rounds} rounds x {TRIALS} trials, ms")
    cols = [(loop, work) for loop in ("streaming", "short ops") for work in ("pull", "store")]
    print(f"{'copy':20s} {'memcpy':>7s} {'pull':>6s} {'store':>6s}  "
          + "  ".join(f"{loop + ' +' + work:>18s}" for loop, work in cols))
    for arm, m in med.items():
        extra = [_added(m[f"{lp}_{wk}"], m[f"{lp}_alone"]) for lp, wk in cols]
        print(f"{arm:20s} {m['memcpy_ms']:7.1f} {m['pull_ms']:6.1f} {m['store_ms']:6.1f}  "
              + "  ".join(f"{e:>18s}" for e in extra))
    print("(loop columns: how much longer the loop took beside the pull or store than alone)")
    new, old = (med[a] for a in ARMS)
    summary: dict[str, object] = {"pull_time_ratio": round(new["pull_ms"] / old["pull_ms"], 3),
               "store_time_ratio": round(new["store_ms"] / old["store_ms"], 3)}
    for lp, wk in cols:
        added = [m[f"{lp}_{wk}"] - m[f"{lp}_alone"] for m in (new, old)]
        summary[f"{lp.replace(' ', '_')}_{wk}_added_ms_new_old"] = [round(x, 1) for x in added]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
