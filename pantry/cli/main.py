"""`pantry`: start a whole system on this machine, or one role."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pantry.common.config_flags import parse_size
from pantry.common.serving import configure_logging

DEFAULT_MODEL = "smollm2"


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, .gguf file or 'smollm2'")
    p.add_argument("--kv-master", required=True, help="kvstore master HOST:PORT")
    p.add_argument("--engine-id", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", default="1GiB", help="paged KV cache size")
    p.add_argument("--max-model-len", type=int, default=0, help="0 = the model's context")
    p.add_argument("--hash-seed", type=int, default=0)
    p.add_argument("--salt", default="")
    p.add_argument("--threads", type=int, default=0, help="0 = one per pinned CPU, or torch's")
    p.add_argument("--cpus", default="", help="pin to these CPUs, e.g. 0,1 (default: none)")
    p.add_argument("--ready-file")


def _role_config(ns: argparse.Namespace, role: str):  # type: ignore[no-untyped-def]
    from engine.role_config import EngineRoleConfig

    return EngineRoleConfig(
        model=ns.model,
        kv_master=ns.kv_master,
        engine_id=ns.engine_id or f"{role}-0",
        host=ns.host,
        port=ns.port,
        block_size=ns.block_size,
        kv_cache_bytes=parse_size(ns.kv_cache_bytes),
        max_model_len=ns.max_model_len,
        hash_seed=ns.hash_seed,
        salt=ns.salt,
        threads=ns.threads,
        cpus=_cpu_list(ns.cpus),
        ready_file=ns.ready_file,
    )


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError as exc:
        raise ValueError(f"cpus: {text!r} is not a comma-separated list of CPU numbers") from exc


def cmd_prefill(ns: argparse.Namespace) -> int:
    from prefill.service import run

    return run(_role_config(ns, "prefill"), chunk_tokens=ns.chunk_tokens)


def cmd_decode(ns: argparse.Namespace) -> int:
    from decode.engine import DecodeLimits
    from decode.service import run

    limits = DecodeLimits(
        max_running=ns.max_running, max_waiting=ns.max_waiting, chunk_tokens=ns.chunk_tokens
    )
    return run(_role_config(ns, "decode"), limits)


def cmd_conductor(ns: argparse.Namespace) -> int:
    from conductor.config import ConductorConfig
    from conductor.server import run

    return run(ConductorConfig(
        model=ns.model,
        kv_master=ns.kv_master,
        prefill=tuple(ns.prefill),
        decode=tuple(ns.decode),
        host=ns.host,
        grpc_port=ns.grpc_port,
        http_port=ns.http_port,
        served_model_name=ns.served_model_name,
        default_max_tokens=ns.default_max_tokens,
        max_concurrent_requests=ns.max_concurrent_requests,
        ttft_slo_s=ns.ttft_slo,
        ready_file=ns.ready_file,
    ))


def cmd_local(ns: argparse.Namespace) -> int:
    from engine.model_files import resolve_model_path
    from pantry.cli.local import LocalOptions, run_local

    resolve_model_path(ns.model)  # a wrong --model fails here, before any role starts

    return run_local(LocalOptions(
        model=ns.model,
        host=ns.host,
        http_port=ns.http_port,
        grpc_port=ns.grpc_port,
        block_size=ns.block_size,
        pool_bytes=parse_size(ns.pool_bytes),
        kv_cache_bytes=parse_size(ns.kv_cache_bytes),
        max_model_len=ns.max_model_len,
        served_model_name=ns.served_model_name,
        max_concurrent_requests=ns.max_concurrent_requests,
        threads=ns.threads,
        pin=ns.pin,
        ready_file=ns.ready_file,
        log_dir=ns.log_dir,
    ))


def _conductor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", default="", help="model id clients use")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pantry", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)

    local = sub.add_parser("local", help="start every role on this machine, each a process")
    local.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, .gguf file or 'smollm2'")
    local.add_argument("--host", default="127.0.0.1")
    _conductor_args(local)
    local.add_argument("--block-size", type=int, default=16)
    local.add_argument("--pool-bytes", default="1GiB", help="DRAM of the storage node")
    local.add_argument("--kv-cache-bytes", default="512MiB", help="paged KV cache per engine")
    local.add_argument("--max-model-len", type=int, default=0)
    local.add_argument("--max-concurrent-requests", type=int, default=256)
    local.add_argument("--threads", type=int, default=0)
    local.add_argument("--no-pin", dest="pin", action="store_false",
                       help="let prefill and decode share every CPU instead of splitting them")
    local.add_argument("--ready-file", help="write the addresses here as JSON when serving")
    local.add_argument("--log-dir", help="one log file per role instead of this terminal")
    local.set_defaults(fn=cmd_local)

    pre = sub.add_parser("prefill", help="run a prefill engine")
    _engine_args(pre)
    pre.add_argument("--chunk-tokens", type=int, default=512)
    pre.set_defaults(fn=cmd_prefill)

    dec = sub.add_parser("decode", help="run a decode engine")
    _engine_args(dec)
    dec.add_argument("--max-running", type=int, default=32)
    dec.add_argument("--max-waiting", type=int, default=256)
    dec.add_argument("--chunk-tokens", type=int, default=256)
    dec.set_defaults(fn=cmd_decode)

    con = sub.add_parser("conductor", help="run the front door (gRPC + OpenAI HTTP)")
    con.add_argument("--model", default=DEFAULT_MODEL, help="for the tokenizer")
    con.add_argument("--kv-master", required=True)
    con.add_argument("--prefill", action="append", required=True, help="HOST:PORT, repeatable")
    con.add_argument("--decode", action="append", required=True, help="HOST:PORT, repeatable")
    con.add_argument("--host", default="127.0.0.1")
    _conductor_args(con)
    con.add_argument("--default-max-tokens", type=int, default=256)
    con.add_argument("--max-concurrent-requests", type=int, default=256)
    con.add_argument("--ttft-slo", type=float, default=0.0, help="seconds; 0 = off")
    con.add_argument("--ready-file")
    con.set_defaults(fn=cmd_conductor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    configure_logging(ns.cmd, ns.log_level)
    from engine.errors import EngineError

    try:
        return int(ns.fn(ns))
    except (ValueError, EngineError) as exc:  # config and model errors say what to change
        print(f"pantry {ns.cmd}: {exc}", file=sys.stderr)
        return 2
