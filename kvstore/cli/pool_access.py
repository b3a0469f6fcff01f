"""What every command that talks to a running pool shares: its flags (--master, --timeout,
--token-file), the client and token they give, and byte counts as the commands print them."""

from __future__ import annotations

import argparse

from kvstore.auth import TOKEN_FILE_ENV, load_token
from kvstore.client import KVStoreClient
from kvstore.config import TOKEN_FILE_HELP, ClientConfig


def add_pool_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", required=True,
                   help="the master, HOST:PORT; a leader and standbys comma-separated")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--token-file", help=TOKEN_FILE_HELP + f"; unset: ${TOKEN_FILE_ENV}")


def token_arg(ns: argparse.Namespace) -> str | None:
    """--token-file's token; None without it (a client then reads $PANTRY_TOKEN_FILE, as every
    other client does)."""
    return None if ns.token_file is None else load_token(ns.token_file)


def pool_client(ns: argparse.Namespace) -> KVStoreClient:
    return KVStoreClient(ns.master, config=ClientConfig(rpc_timeout_s=ns.timeout),
                         token=token_arg(ns))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
