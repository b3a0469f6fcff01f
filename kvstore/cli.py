"""The `kvstore` command: run a master or a node, and inspect or edit the pool."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.auth import TOKEN_FILE_ENV, load_token, token_from_env
from kvstore.bench import TIERS, TRANSPORTS, BenchConfig, bench_client, run_bench
from kvstore.client import KVStoreClient
from kvstore.config import (
    TOKEN_FILE_HELP,
    ClientConfig,
    MasterConfig,
    NodeConfig,
    master_addresses,
)
from kvstore.errors import KVStoreError
from kvstore.events import EventGap, PoolEvent
from kvstore.json_view import dumps, event_json, objects_json, status_json
from kvstore.metadata import NodeStatus
from pantry.common.config_flags import add_config_flags, config_from_args, parse_size
from pantry.common.errors import ConfigError
from pantry.common.metrics import configure_metrics
from pantry.common.serving import configure_logging, format_table, wait_for_signal, write_ready_file
from pantry.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def master_config(ns: argparse.Namespace) -> MasterConfig:
    return config_from_args(MasterConfig, ns)


def node_config(ns: argparse.Namespace) -> NodeConfig:
    return config_from_args(NodeConfig, ns, **({"tcp_port": None} if ns.no_tcp else {}))


def cmd_master(ns: argparse.Namespace) -> int:
    from kvstore.master_service import start_master

    cfg = master_config(ns)
    srv = start_master(cfg)
    try:
        write_ready_file(ns.ready_file, f"{cfg.host}:{srv.port}", metrics=srv.metrics.url)
        wait_for_signal()
    finally:
        srv.stop(grace=ns.grace)
    log.info("master stopped")
    return 0


def cmd_node(ns: argparse.Namespace) -> int:
    from kvstore.node_service import start_node

    srv = start_node(node_config(ns))
    try:
        write_ready_file(ns.ready_file, srv.address, metrics=srv.metrics.url)
        wait_for_signal()
    finally:
        srv.stop(grace=ns.grace)
    log.info("node stopped")
    return 0


def _client(ns: argparse.Namespace) -> KVStoreClient:
    # Without --token-file the client reads $PANTRY_TOKEN_FILE, as every other client does.
    token = None if ns.token_file is None else load_token(ns.token_file)
    return KVStoreClient(ns.master, config=ClientConfig(rpc_timeout_s=ns.timeout), token=token)


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
    with _client(ns) as c:
        s = c.status()
    # With one master, the one that answered leads; with several, ask each (the leader's
    # own address may be a name only the masters resolve, e.g. a pod's DNS name).
    roles = ([(ns.master, s.role or "leader")] if len(master_addresses(ns.master)) == 1
             else master_roles(ns.master, min(ns.timeout, 2.0)))
    if ns.json:
        print(dumps({**status_json(s), "leader": s.leader,
                     "masters": [{"address": a, "role": r} for a, r in roles]}))
        return 0
    rows = [(n.node.node_id, n.node.address, n.node.host_id, _human(n.capacity_bytes),
             _human(n.used_bytes), f"{100 * n.used_bytes / max(n.capacity_bytes, 1):.1f}%",
             n.objects, *_ssd_columns(n), f"{n.heartbeat_age_s:.1f}s",
             "draining" if n.draining else "up")
            for n in s.nodes]
    print(format_table(("NODE", "ADDRESS", "HOST", "CAPACITY", "USED", "USE%", "OBJECTS",
                        "SSD CAPACITY", "SSD USED", "SSD OBJECTS", "HB AGE", "STATE"), rows))
    print(f"\nnodes {len(s.nodes)}  capacity {_human(s.capacity_bytes)}  used "
          f"{_human(s.used_bytes)}  objects {s.objects}  puts {s.puts}  hits {s.hits}  "
          f"misses {s.misses}  evictions {s.evictions}")
    print(f"leader {s.leader or '?'}  masters " + ", ".join(f"{a} ({r})" for a, r in roles))
    return 0


def _ssd_columns(n: NodeStatus) -> tuple[str, str, str]:
    """A node's SSD tier for the status table; dashes for a node without one."""
    if not n.node.ssd_bytes:
        return "-", "-", "-"
    return _human(n.node.ssd_bytes), _human(n.ssd_used_bytes), str(n.ssd_objects)


def cmd_ls(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
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
    with _client(ns) as c:
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


def cmd_put(ns: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if ns.file == "-" else Path(ns.file).read_bytes()
    with _client(ns) as c:
        (ok,) = c.put_many([(ns.key, data)], replicas=ns.replicas)
    if not ok:
        print(f"not stored: {ns.key} (no space or a concurrent put)", file=sys.stderr)
        return 1
    print(f"stored {ns.key} ({len(data)} bytes)")
    return 0


def cmd_exists(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
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


def cmd_evict(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        n, nbytes = c.evict(nbytes=ns.bytes or 0, prefix=ns.prefix or "", everything=ns.all)
    print(f"evicted {n} objects ({_human(nbytes)})")
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        n = c.remove(ns.keys)
    print(f"removed {n} of {len(ns.keys)}")
    return 0 if n == len(ns.keys) else 1


def cmd_drain(ns: argparse.Namespace) -> int:
    from kvstore.drain import drain_node

    with _client(ns) as c:
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
    token = None if ns.token_file is None else load_token(ns.token_file)
    # Put then get: the bar counts both passes' bytes (only on a terminal).
    with (bench_client(ns.master, cfg, ns.timeout, token) as c,
          tqdm(total=2 * cfg.count * cfg.object_size, unit="B", unit_scale=True,
               desc=f"bench {cfg.transport}", disable=None) as bar):
        r = run_bench(c, cfg, bar.update)
    if ns.json:
        print(dumps(r.as_json()))
        return 0
    print(format_table(("TRANSPORT", "TIER", "OBJECT", "STORED", "HITS", "PUT GB/s", "GET GB/s"),
                       [(",".join(r.transports) or "-", r.tier, _human(r.object_size),
                         f"{r.stored}/{r.count}", r.hits, f"{r.put_gb_per_s:.2f}",
                         f"{r.get_gb_per_s:.2f}")]))
    return 0


def _reporting(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag's ConfigError (e.g. "not a size: 'lots'") becomes argparse's message for it."""

    @functools.wraps(convert)
    def wrapped(text: str) -> Any:
        try:
            return convert(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return wrapped


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, exit status 2, like every other kvstore error."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if callable(kwargs.get("type")):
            kwargs["type"] = _reporting(kwargs["type"])
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", help="write {address, pid, metrics} as JSON here once serving")
    p.add_argument("--grace", type=float, default=1.0,
                   help="seconds in-flight RPCs get to finish on SIGTERM (default: 1.0)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvstore", description="Pantry KV-cache pool")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("master", help="run the metadata master")
    add_config_flags(m, MasterConfig)
    _server_flags(m)
    m.set_defaults(fn=cmd_master)

    n = sub.add_parser("node", help="run a storage node")
    add_config_flags(n, NodeConfig)
    n.add_argument("--no-tcp", action="store_true", help="serve data over gRPC only")
    _server_flags(n)
    n.set_defaults(fn=cmd_node)

    def client_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--master", required=True,
                       help="the master, HOST:PORT; a leader and standbys comma-separated")
        c.add_argument("--timeout", type=float, default=10.0)
        c.add_argument("--token-file", help=TOKEN_FILE_HELP + f"; unset: ${TOKEN_FILE_ENV}")
        return c

    json_help = "print one JSON object instead of a table"
    st = client_cmd("status", "pool capacity, usage and nodes")
    st.add_argument("--json", action="store_true", help=json_help)
    st.set_defaults(fn=cmd_status)
    ls = client_cmd("ls", "list objects")
    ls.add_argument("--json", action="store_true", help=json_help)
    ls.add_argument("--prefix", default="")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(fn=cmd_ls)
    g = client_cmd("get", "fetch one object")
    g.add_argument("key")
    g.add_argument("-o", "--output")
    g.add_argument("--json", action="store_true",
                   help="print the object's key, hit and length as JSON (its bytes only to -o)")
    g.set_defaults(fn=cmd_get)
    pu = client_cmd("put", "store a file as one object")
    pu.add_argument("key")
    pu.add_argument("file", help="path, or - for stdin")
    pu.add_argument("--replicas", type=int, help="copies on distinct nodes (default: the "
                                                 "master's --replicas)")
    pu.set_defaults(fn=cmd_put)
    ev = client_cmd("evict", "evict sealed objects (a reader's leased slot is kept until its "
                             "lease ends)")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--bytes", type=parse_size, help="at least this much (e.g. 64MiB), least "
                                                        "recently used first")
    which.add_argument("--prefix", help="every object whose key starts with this")
    which.add_argument("--all", action="store_true", help="every object")
    ev.set_defaults(fn=cmd_evict)
    ex = client_cmd("exists", "whether objects are stored (exit status 1 if any is not)")
    ex.add_argument("keys", nargs="+")
    ex.add_argument("--json", action="store_true", help=json_help)
    ex.set_defaults(fn=cmd_exists)
    evs = client_cmd("events", "follow the pool's events (stored, removed, evicted, nodes) "
                               "until Ctrl-C")
    evs.add_argument("--from-seq", type=int, default=0,
                     help="first sequence number of the master's run (default: from now on)")
    evs.add_argument("--prefix", default="", help="only keys starting with this")
    evs.add_argument("--count", type=int, default=0, help="stop after this many events")
    evs.add_argument("--json", action="store_true", help="one JSON object per line")
    evs.set_defaults(fn=cmd_events)
    r = client_cmd("rm", "remove objects")
    r.add_argument("keys", nargs="+")
    r.set_defaults(fn=cmd_rm)
    d = client_cmd("drain", "move a node's objects to other nodes (dropping those that fit "
                            "nowhere) while reads go on; no new objects go to it")
    d.add_argument("node_id")
    d.add_argument("--batch", type=int, default=256, help="objects moved per round (default 256)")
    d.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for puts under way on the node (default 120)")
    d.add_argument("--cancel", action="store_true", help="take the node back instead")
    d.set_defaults(fn=cmd_drain)
    b = client_cmd("bench", "put and get throughput of the pool through one transport")
    b.add_argument("--object-size", type=parse_size, default="2MiB",
                   help="bytes per object (default 2MiB)")
    b.add_argument("--count", type=int, default=64, help="objects (default 64)")
    b.add_argument("--transport", choices=TRANSPORTS, default="tcp",
                   help="shm: as a client on a node's host; tcp, grpc: as one on another host "
                        "(default tcp)")
    b.add_argument("--tier", choices=TIERS, default=TIERS[0],
                   help="the tier read from; ssd: the copies the nodes spilled, once spilled "
                        "(files just written may be read from the page cache)")
    b.add_argument("--spill-wait", type=float, default=BenchConfig.spill_wait_s,
                   help="--tier ssd: seconds the nodes may take to spill every object "
                        "(default %(default)s)")
    b.add_argument("--host-id", help="this host's id, for shm (default: the machine's)")
    b.add_argument("--json", action="store_true", help=json_help)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    role = {"master": "kv-master", "node": "kv-node"}.get(ns.cmd, "kvstore")
    configure_logging(role, "DEBUG" if ns.verbose else "INFO")
    configure_metrics()
    try:
        return int(ns.fn(ns))
    except (KVStoreError, ConfigError, OSError) as e:
        # OSError: a port that cannot be bound, a segment that cannot be created.
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        # One readable line (e.g. master unreachable) rather than a traceback.
        code = e.code() if isinstance(e, grpc.Call) else None
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        print(f"kvstore: rpc failed: {code}: {details}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
