"""The `kvstore` command line: its parser (each subcommand and its flags) and `main`, which
runs a command and turns the failures a user can act on into one line and an exit status."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from kvstore.bench import TIERS, TRANSPORTS, BenchConfig
from kvstore.cli import edits, queries, roles
from kvstore.cli.pool_access import add_pool_flags
from kvstore.config import MasterConfig, NodeConfig
from kvstore.errors import KVStoreError
from pantry.common.config_flags import add_config_flags, parse_size
from pantry.common.errors import ConfigError
from pantry.common.metrics import configure_metrics
from pantry.common.serving import configure_logging


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
    m.set_defaults(fn=roles.cmd_master)

    n = sub.add_parser("node", help="run a storage node")
    add_config_flags(n, NodeConfig)
    n.add_argument("--no-tcp", action="store_true", help="serve data over gRPC only")
    _server_flags(n)
    n.set_defaults(fn=roles.cmd_node)

    def client_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        add_pool_flags(c)
        return c

    json_help = "print one JSON object instead of a table"
    st = client_cmd("status", "pool capacity, usage and nodes")
    st.add_argument("--json", action="store_true", help=json_help)
    st.set_defaults(fn=queries.cmd_status)
    ls = client_cmd("ls", "list objects")
    ls.add_argument("--json", action="store_true", help=json_help)
    ls.add_argument("--prefix", default="")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(fn=queries.cmd_ls)
    g = client_cmd("get", "fetch one object")
    g.add_argument("key")
    g.add_argument("-o", "--output")
    g.add_argument("--json", action="store_true",
                   help="print the object's key, hit and length as JSON (its bytes only to -o)")
    g.set_defaults(fn=queries.cmd_get)
    pu = client_cmd("put", "store a file as one object")
    pu.add_argument("key")
    pu.add_argument("file", help="path, or - for stdin")
    pu.add_argument("--replicas", type=int, help="copies on distinct nodes (default: the "
                                                 "master's --replicas)")
    pu.set_defaults(fn=edits.cmd_put)
    ev = client_cmd("evict", "evict sealed objects (a reader's leased slot is kept until its "
                             "lease ends)")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--bytes", type=parse_size, help="at least this much (e.g. 64MiB), least "
                                                        "recently used first")
    which.add_argument("--prefix", help="every object whose key starts with this")
    which.add_argument("--all", action="store_true", help="every object")
    ev.set_defaults(fn=edits.cmd_evict)
    ex = client_cmd("exists", "whether objects are stored (exit status 1 if any is not)")
    ex.add_argument("keys", nargs="+")
    ex.add_argument("--json", action="store_true", help=json_help)
    ex.set_defaults(fn=queries.cmd_exists)
    evs = client_cmd("events", "follow the pool's events (stored, removed, evicted, nodes) "
                               "until Ctrl-C")
    evs.add_argument("--from-seq", type=int, default=0,
                     help="first sequence number of the master's run (default: from now on)")
    evs.add_argument("--prefix", default="", help="only keys starting with this")
    evs.add_argument("--count", type=int, default=0, help="stop after this many events")
    evs.add_argument("--json", action="store_true", help="one JSON object per line")
    evs.set_defaults(fn=queries.cmd_events)
    r = client_cmd("rm", "remove objects")
    r.add_argument("keys", nargs="+")
    r.set_defaults(fn=edits.cmd_rm)
    d = client_cmd("drain", "move a node's objects to other nodes (dropping those that fit "
                            "nowhere) while reads go on; no new objects go to it")
    d.add_argument("node_id")
    d.add_argument("--batch", type=int, default=256, help="objects moved per round (default 256)")
    d.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for puts under way on the node (default 120)")
    d.add_argument("--cancel", action="store_true", help="take the node back instead")
    d.set_defaults(fn=edits.cmd_drain)
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
    b.set_defaults(fn=edits.cmd_bench)
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
