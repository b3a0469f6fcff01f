"""The commands that look at the pool and change nothing: `status`, `ls`, `get`, `exists` and
`events`, each as a table (or raw bytes, for `get`) or, with --json, as JSON."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.auth import load_token, token_from_env
from kvstore.cli.pool_access import human, pool_client
from kvstore.config import master_addresses
from kvstore.events import EventGap, PoolEvent
from kvstore.json_view import dumps, event_json, objects_json, status_json
from kvstore.metadata import NodeStatus
from pantry.common.serving import format_table
from pantry.v1 import kvstore_pb2 as pb

_MASTER_SERVICE = pb.DESCRIPTOR.services_by_name["KVMaster"].full_name
_ROLE = {health_pb2.HealthCheckResponse.SERVING: "leader",
         health_pb2.HealthCheckResponse.NOT_SERVING: "standby"}


def master_roles(masters: str, timeout_s: float) -> list[tuple[str, str]]:
    """(address, role) of each master of `--master`: what its gRPC health says of the KVMaster
    service (SERVING only on the leader), "unreachable" when it does not answer. Health needs no
    service token."""
    out = []
    for address in master_addresses(masters):
        with grpc.insecure_channel(address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=_MASTER_SERVICE), timeout=timeout_s)
                out.append((address, _ROLE.get(resp.status, "unknown")))
            except grpc.RpcError:
                out.append((address, "unreachable"))
    return out


def cmd_status(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        s = c.status()
    # With one master, the one that answered leads; with several, ask each (the leader's
    # own address may be a name only the masters resolve, e.g. a pod's DNS name).
    roles = ([(ns.master, s.role or "leader")] if len(master_addresses(ns.master)) == 1
             else master_roles(ns.master, min(ns.timeout, 2.0)))
    if ns.json:
        print(dumps({**status_json(s), "leader": s.leader,
                     "masters": [{"address": a, "role": r} for a, r in roles]}))
        return 0
    rows = [(n.node.node_id, n.node.address, n.node.host_id, human(n.capacity_bytes),
             human(n.used_bytes), f"{100 * n.used_bytes / max(n.capacity_bytes, 1):.1f}%",
             n.objects, *_ssd_columns(n), f"{n.heartbeat_age_s:.1f}s",
             "draining" if n.draining else "up")
            for n in s.nodes]
    print(format_table(("NODE", "ADDRESS", "HOST", "CAPACITY", "USED", "USE%", "OBJECTS",
                        "SSD CAPACITY", "SSD USED", "SSD OBJECTS", "HB AGE", "STATE"), rows))
    print(f"\nnodes {len(s.nodes)}  capacity {human(s.capacity_bytes)}  used "
          f"{human(s.used_bytes)}  objects {s.objects}  puts {s.puts}  hits {s.hits}  "
          f"misses {s.misses}  evictions {s.evictions}")
    print(f"leader {s.leader or '?'}  masters " + ", ".join(f"{a} ({r})" for a, r in roles))
    return 0


def _ssd_columns(n: NodeStatus) -> tuple[str, str, str]:
    """A node's SSD tier for the status table; dashes for a node without one."""
    if not n.node.ssd_bytes:
        return "-", "-", "-"
    return human(n.node.ssd_bytes), human(n.ssd_used_bytes), str(n.ssd_objects)


def cmd_ls(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        objs, truncated = c.list_objects(ns.prefix, ns.limit)
    if ns.json:
        print(dumps(objects_json(objs, truncated)))
        return 0
    rows = [(o.location.key, o.location.node_id, o.location.tier, o.location.offset,
             o.location.length, "sealed" if o.sealed else "pending", "yes" if o.leased else "")
            for o in objs]
    print(format_table(("KEY", "NODE", "TIER", "OFFSET", "LENGTH", "STATE", "LEASED"), rows))
    if truncated:
        print(f"... more objects; raise --limit (now {ns.limit})")
    return 0


def cmd_get(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        (data,) = c.get_many([ns.key])
    if ns.json:
        # The object's facts on stdout; its bytes only to -o.
        if data is not None and ns.output and ns.output != "-":
            Path(ns.output).write_bytes(data)
        print(dumps({"key": ns.key, "hit": data is not None,
                     "length": None if data is None else len(data)}))
        return 0 if data is not None else 1
    if data is None:
        print(f"miss: {ns.key}", file=sys.stderr)
        return 1
    if ns.output and ns.output != "-":
        Path(ns.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def cmd_exists(ns: argparse.Namespace) -> int:
    with pool_client(ns) as c:
        found = c.exists(ns.keys)
    if ns.json:
        print(dumps({"exists": dict(zip(ns.keys, found, strict=True))}))
    else:
        print(format_table(("KEY", "EXISTS"), [(k, "yes" if f else "no")
                                                for k, f in zip(ns.keys, found, strict=True)]))
    return 0 if all(found) else 1


def cmd_events(ns: argparse.Namespace) -> int:
    from kvstore.event_watch import EventWatcher

    token = load_token(ns.token_file) if ns.token_file else token_from_env()
    watcher = EventWatcher(ns.master, token, from_seq=ns.from_seq, prefix=ns.prefix)
    n = 0
    try:
        for e in watcher:
            if ns.json:
                print(dumps(event_json(e)), flush=True)
            elif isinstance(e, EventGap):
                print(f"-- {e.lost} events lost (no longer in the master's ring)", flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(e.time))
                print(f"{e.seq:>8}  {when}  {e.kind.value:<11}  {e.node_id:<16}  "
                      f"{e.tier or '-':<4}  {e.key or '-'}", flush=True)
            n += isinstance(e, PoolEvent)
            if ns.count and n >= ns.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
    return 0
