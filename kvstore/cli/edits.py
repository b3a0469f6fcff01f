"""The commands that change the pool: `put`, `evict`, `rm`, `drain`, and `bench` (which
stores and reads objects of its own)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvstore.bench import BenchConfig, bench_client, run_bench
from kvstore.cli.pool_access import human, pool_client, token_arg
from kvstore.json_view import dumps
from pantry.common.serving import format_table


def cmd_put(ns: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if ns.file == "-" else Path(ns.file).read_bytes()
    with pool_client(ns) as c:
        (ok,) = c.put_many([(ns.key, data)], replicas=ns.replicas)
    if not ok:
        print(f"not stored: {ns.key} (no space or a concurrent put)", file=sys.stderr)
        return 1
    print(f"stored {ns.key} ({len(data)} bytes)")
    return 0


def cmd_evict(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        n, nbytes = c.evict(nbytes=ns.bytes or 0, prefix=ns.prefix or "", everything=ns.all)
    print(f"evicted {n} objects ({human(nbytes)})")
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        n = c.remove(ns.keys)
    print(f"removed {n} of {len(ns.keys)}")
    return 0 if n == len(ns.keys) else 1


def cmd_drain(ns: argparse.Namespace) -> int:
    from kvstore.drain import drain_node

    with pool_client(ns) as c:
        if ns.cancel:
            c.drain(ns.node_id, cancel=True)
            print(f"node {ns.node_id} takes new objects again")
            return 0
        r = drain_node(c, ns.node_id, batch=ns.batch, timeout_s=ns.wait)
    print(f"drained {r.node_id} in {r.seconds:.2f} s: {r.moved} objects moved, {r.dropped} "
          "dropped (no room elsewhere); it takes no new objects until `kvstore drain --cancel`")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    cfg = BenchConfig(ns.object_size, ns.count, ns.transport, ns.tier,
                      spill_wait_s=ns.spill_wait,
                      **({"host_id": ns.host_id} if ns.host_id else {}))
    # Put then get: the bar counts both passes' bytes (only on a terminal).
    with (bench_client(ns.master, cfg, ns.timeout, token_arg(ns)) as c,
          tqdm(total=2 * cfg.count * cfg.object_size, unit="B", unit_scale=True,
               desc=f"bench {cfg.transport}", disable=None) as bar):
        r = run_bench(c, cfg, bar.update)
    if ns.json:
        print(dumps(r.as_json()))
        return 0
    print(format_table(("TRANSPORT", "TIER", "OBJECT", "STORED", "HITS", "PUT GB/s", "GET GB/s"),
                       [(",".join(r.transports) or "-", r.tier, human(r.object_size),
                         f"{r.stored}/{r.count}", r.hits, f"{r.put_gb_per_s:.2f}",
                         f"{r.get_gb_per_s:.2f}")]))
    return 0
