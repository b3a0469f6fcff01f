"""The `kvstore` command: run a master or a node, and inspect or edit the pool."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from kvstore.auth import TOKEN_FILE_ENV, load_token
from kvstore.client import KVStoreClient
from kvstore.config import TOKEN_FILE_HELP, ClientConfig, MasterConfig, NodeConfig
from kvstore.errors import KVStoreError
from pantry.common.config_flags import add_config_flags, config_from_args, parse_size
from pantry.common.errors import ConfigError
from pantry.common.metrics import configure_metrics
from pantry.common.serving import configure_logging, format_table, wait_for_signal, write_ready_file

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
        c.add_argument("--master", required=True)
        c.add_argument("--timeout", type=float, default=10.0)
        c.add_argument("--token-file", help=TOKEN_FILE_HELP + f"; unset: ${TOKEN_FILE_ENV}")
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
    ev = client_cmd("evict", "evict sealed objects (a reader's leased slot is kept until its "
                             "lease ends)")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--bytes", type=parse_size, help="at least this much (e.g. 64MiB), least "
                                                        "recently used first")
    which.add_argument("--prefix", help="every object whose key starts with this")
    which.add_argument("--all", action="store_true", help="every object")
    ev.set_defaults(fn=cmd_evict)
    r = client_cmd("rm", "remove objects")
    r.add_argument("keys", nargs="+")
    r.set_defaults(fn=cmd_rm)
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
