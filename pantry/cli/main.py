"""`pantry`: start a whole system on this machine, or one role."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from conductor.config import ConductorConfig
from decode.config import DecodeLimits
from engine.errors import EngineError
from engine.model_files import DEFAULT_MODEL_SPEC
from engine.role_config import EngineRoleConfig
from pantry.cli.local_options import LocalOptions
from pantry.cli.replay import add_replay_flags
from pantry.cli.vllm_serve import add_parser as add_vllm_serve
from pantry.common.config_flags import add_config_flags, config_from_args
from pantry.common.errors import ConfigError
from pantry.common.metrics import configure_metrics
from pantry.common.serving import configure_logging
from prefill.config import PrefillLimits


def cmd_prefill(ns: argparse.Namespace) -> int:
    from prefill.service import run

    return run(config_from_args(EngineRoleConfig, ns), config_from_args(PrefillLimits, ns))


def cmd_decode(ns: argparse.Namespace) -> int:
    from decode.service import run

    return run(config_from_args(EngineRoleConfig, ns), config_from_args(DecodeLimits, ns))


def cmd_conductor(ns: argparse.Namespace) -> int:
    from conductor.server import run

    return run(config_from_args(ConductorConfig, ns))


def cmd_local(ns: argparse.Namespace) -> int:
    from engine.model_files import resolve_model_path
    from pantry.cli.local import run_local

    options = config_from_args(LocalOptions, ns)
    resolve_model_path(options.model)  # a wrong --model fails here, before any role starts
    return run_local(options)


def cmd_replay(ns: argparse.Namespace) -> int:
    from pantry.cli.replay import run_replay

    return run_replay(ns)


def build_parser() -> argparse.ArgumentParser:
    """Every flag comes from a field of the role's config dataclass, default and help included."""
    parser = argparse.ArgumentParser(prog="pantry", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)
    model = {"model": DEFAULT_MODEL_SPEC}

    local = sub.add_parser("local", help="start every role on this machine, each a process")
    add_config_flags(local, LocalOptions)
    local.set_defaults(fn=cmd_local)

    pre = sub.add_parser("prefill", help="run a prefill engine")
    add_config_flags(pre, EngineRoleConfig, defaults={**model, "engine_id": "prefill-0"})
    add_config_flags(pre, PrefillLimits)
    pre.set_defaults(fn=cmd_prefill)

    dec = sub.add_parser("decode", help="run a decode engine")
    add_config_flags(dec, EngineRoleConfig, defaults={**model, "engine_id": "decode-0"})
    add_config_flags(dec, DecodeLimits)
    dec.set_defaults(fn=cmd_decode)

    con = sub.add_parser("conductor", help="run the front door (gRPC + OpenAI HTTP)")
    add_config_flags(con, ConductorConfig, defaults=model)
    con.set_defaults(fn=cmd_conductor)

    rep = sub.add_parser("replay", help="replay a Mooncake-format trace (--simulate: against "
                                        "a cost model of a GPU cluster)")
    add_replay_flags(rep)
    rep.set_defaults(fn=cmd_replay)

    add_vllm_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    configure_logging(ns.cmd, ns.log_level)
    configure_metrics()
    try:
        return int(ns.fn(ns))
    except (ConfigError, EngineError) as exc:  # config and model errors say what to change
        print(f"pantry {ns.cmd}: {exc}", file=sys.stderr)
        return 2
