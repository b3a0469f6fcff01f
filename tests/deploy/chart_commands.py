"""A rendered container's command line, parsed by the real `pantry` / `kvstore` parser into the
role's config dataclasses, as the CLI does at start."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from conductor.config import ConductorConfig
from decode.config import DecodeLimits
from engine.role_config import EngineRoleConfig
from kvstore.cli import build_parser as kvstore_parser
from kvstore.cli import master_config, node_config
from pantry.cli.main import build_parser as pantry_parser
from pantry.common.config_flags import config_from_args
from prefill.config import PrefillLimits

# What Kubernetes puts in $(VAR) references of args (downward API).
POD_ENV = {"POD_NAME": "t-pantry-x-0", "POD_IP": "10.1.2.3", "NODE_NAME": "worker-1"}


def _expand(arg: str, env_names: set[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env_names, f"$({m.group(1)}) is not in the container's env"
        return POD_ENV[m.group(1)]

    return re.sub(r"\$\(([A-Z_]+)\)", sub, arg)


def parse_container(c: dict[str, Any]) -> tuple[argparse.Namespace, list[Any]]:
    """Parses the container's command line with the CLI's own parser and builds the role's config
    dataclasses from it (their validation included), as the CLI does at start."""
    env_names = {e["name"] for e in c.get("env", [])}
    argv = [_expand(a, env_names) for a in [*c["command"][1:], *c["args"]]]
    program = c["command"][0]
    try:
        if program == "pantry":
            ns = pantry_parser().parse_args(argv)
            limits: dict[str, list[type[Any]]] = {
                "conductor": [], "prefill": [PrefillLimits], "decode": [DecodeLimits]}
            base = ConductorConfig if ns.cmd == "conductor" else EngineRoleConfig
            configs = [config_from_args(cls, ns) for cls in (base, *limits[ns.cmd])]
        else:
            assert program == "kvstore", c["command"]
            ns = kvstore_parser().parse_args(argv)
            configs = [master_config(ns) if ns.cmd == "master" else node_config(ns)]
    except SystemExit as exc:  # argparse's exit on an unknown or malformed flag
        pytest.fail(f"{program} refused {argv}: exit {exc.code}")
    return ns, configs


def config_of(c: dict[str, Any]) -> Any:
    """The role's main config (MasterConfig, NodeConfig, EngineRoleConfig, ConductorConfig) from
    the container's command line."""
    return parse_container(c)[1][0]
