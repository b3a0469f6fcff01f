"""The `kvstore` command: run a master or a node, and inspect or edit the pool."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.errors import KVStoreError
from pantry.common.config_flags import parse_size
from pantry.common.errors import ConfigError
from pantry.common.serving import configure_logging, format_table, wait_for_signal, write_ready_file

log = logging.getLogger("kvstore")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_master(ns: argparse.Namespace) -> int:
    from kvstore.master_service import start_master

    cfg = MasterConfig(host=ns.host, port=ns.port, node_timeout_s=ns.node_timeout,
                       put_timeout_s=ns.put_timeout, lease_ms=ns.lease_ms,
                       max_object_bytes=parse_size(ns.max_object_bytes))
    srv = start_master(cfg)
    if ns.ready_file:
        write_ready_file(ns.ready_file, f"{ns.host}:{srv.port}")
    wait_for_signal()
    srv.stop(grace=ns.grace)
    log.info("master stopped")
    return 0


def cmd_node(ns: argparse.Namespace) -> int:
    from kvstore.node_service import start_node

    cfg = NodeConfig(master_address=ns.master, node_id=ns.node_id,
                     dram_bytes=parse_size(ns.dram_bytes), host=ns.host, port=ns.port,
                     heartbeat_s=ns.heartbeat, host_id=ns.host_id,
                     max_object_bytes=parse_size(ns.max_object_bytes),
                     tcp_port=None if ns.no_tcp else ns.tcp_port)
    srv = start_node(cfg)
    try:
        if ns.ready_file:
            write_ready_file(ns.ready_file, srv.address)
        wait_for_signal()
    finally:
        srv.stop(grace=ns.grace)
    log.info("node stopped")
    return 0


def _client(ns: argparse.Namespace) -> KVStoreClient:
    return KVStoreClient(ns.master, config=ClientConfig(rpc_timeout_s=ns.timeout))


def cmd_status(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        s = c.status()
    rows = [(n.node.node_id, n.node.address, n.node.host_id, _human(n.capacity_bytes),
             _human(n.used_bytes), f"{100 * n.used_bytes / max(n.capacity_bytes, 1):.1f}%",
             n.objects, f"{n.heartbeat_age_s:.1f}s") for n in s.nodes]
    print(format_table(("NODE", "ADDRESS", "HOST", "CAPACITY", "USED", "USE%", "OBJECTS", "HB AGE"),
                 rows))
    print(f"\nnodes {len(s.nodes)}  capacity {_human(s.capacity_bytes)}  used "
          f"{_human(s.used_bytes)}  objects {s.objects}  puts {s.puts}  hits {s.hits}  "
          f"misses {s.misses}  evictions {s.evictions}")
    return 0


def cmd_ls(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        objs, truncated = c.list_objects(ns.prefix, ns.limit)
    rows = [(o.location.key, o.location.node_id, o.location.offset, o.location.length,
             "sealed" if o.sealed else "pending", "yes" if o.leased else "") for o in objs]
    print(format_table(("KEY", "NODE", "OFFSET", "LENGTH", "STATE", "LEASED"), rows))
    if truncated:
        print(f"... more objects; raise --limit (now {ns.limit})")
    return 0


def cmd_get(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        (data,) = c.get_many([ns.key])
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
        (ok,) = c.put_many([(ns.key, data)])
    if not ok:
        print(f"not stored: {ns.key} (no space or a concurrent put)", file=sys.stderr)
        return 1
    print(f"stored {ns.key} ({len(data)} bytes)")
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        n = c.remove(ns.keys)
    print(f"removed {n} of {len(ns.keys)}")
    return 0 if n == len(ns.keys) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore", description="Pantry KV-cache pool")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("master", help="run the metadata master")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=0)
    m.add_argument("--ready-file")
    m.add_argument("--node-timeout", type=float, default=10.0)
    m.add_argument("--put-timeout", type=float, default=30.0)
    m.add_argument("--lease-ms", type=int, default=5000)
    m.add_argument("--max-object-bytes", default="64MiB")
    m.add_argument("--grace", type=float, default=1.0)
    m.set_defaults(fn=cmd_master)

    n = sub.add_parser("node", help="run a storage node")
    n.add_argument("--master", required=True)
    n.add_argument("--node-id", required=True)
    n.add_argument("--host", default="127.0.0.1")
    n.add_argument("--port", type=int, default=0)
    n.add_argument("--dram-bytes", default="256MiB")
    n.add_argument("--heartbeat", type=float, default=2.0)
    n.add_argument("--host-id")
    n.add_argument("--max-object-bytes", default="64MiB")
    n.add_argument("--tcp-port", type=int, default=0, help="bulk TCP transport port (0: any)")
    n.add_argument("--no-tcp", action="store_true", help="serve data over gRPC only")
    n.add_argument("--ready-file")
    n.add_argument("--grace", type=float, default=1.0)
    n.set_defaults(fn=cmd_node)

    def client_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--master", required=True)
        c.add_argument("--timeout", type=float, default=10.0)
        return c

    client_cmd("status", "pool capacity, usage and nodes").set_defaults(fn=cmd_status)
    ls = client_cmd("ls", "list objects")
    ls.add_argument("--prefix", default="")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(fn=cmd_ls)
    g = client_cmd("get", "fetch one object")
    g.add_argument("key")
    g.add_argument("-o", "--output")
    g.set_defaults(fn=cmd_get)
    pu = client_cmd("put", "store a file as one object")
    pu.add_argument("key")
    pu.add_argument("file", help="path, or - for stdin")
    pu.set_defaults(fn=cmd_put)
    r = client_cmd("rm", "remove objects")
    r.add_argument("keys", nargs="+")
    r.set_defaults(fn=cmd_rm)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    role = {"master": "kv-master", "node": "kv-node"}.get(ns.cmd, "kvstore")
    configure_logging(role, "DEBUG" if ns.verbose else "INFO")
    try:
        return int(ns.fn(ns))
    except (KVStoreError, ConfigError) as e:
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
