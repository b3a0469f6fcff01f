"""Shared by tests/prefill and tests/decode: a real in-process kvstore (master + one node on
127.0.0.1, port 0), real engine cores over a tiny random llama, and transformers as the oracle.

A plain module (no package): both folders import it as `tests.decode.engine_rig`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from engine.loader import load_model
from engine.role_config import EngineRoleConfig
from engine.role_core import EngineCore
from kvstore.block_object import encoded_size
from kvstore.client import KVStoreClient
from kvstore.config import ClientConfig, MasterConfig, NodeConfig
from kvstore.master_service import start_master
from kvstore.node_service import start_node
from pantry.common.config_flags import MIB
from tests.kvstore.kv_helpers import wait_for

BLOCK = 16
VOCAB = 512
MAX_MODEL_LEN = 256        # the tiny model's max_position_embeddings
KV_CACHE_BYTES = 1 * MIB   # 128 blocks of 16 tokens for the tiny llama


@contextmanager
def running_pool(tag: str) -> Iterator[str]:
    """A kvstore master and one node; yields the master address."""
    master = start_master(MasterConfig(port=0, node_timeout_s=5.0, reap_interval_s=0.2,
                                       lease_ms=2000, max_object_bytes=4 * MIB))
    address = f"127.0.0.1:{master.port}"
    node_id = f"{tag}-{os.getpid()}"
    node = None
    try:
        node = start_node(NodeConfig(master_address=address, node_id=node_id,
                                     dram_bytes=32 * MIB, host_id="host-a", heartbeat_s=0.5,
                                     max_object_bytes=4 * MIB, prefault=False))
        with KVStoreClient(address, host_id="probe") as probe:
            wait_for(lambda: any(n.node.node_id == node_id for n in probe.status().nodes),
                     what=f"node {node_id} registered")
        yield address
    finally:
        if node is not None:
            node.stop(grace=0)
        master.stop(grace=0)


def pool_client(address: str) -> KVStoreClient:
    return KVStoreClient(address, host_id="host-a",
                         config=ClientConfig(max_object_bytes=4 * MIB, rpc_timeout_s=5.0))


def make_core(model_dir: Path, address: str, role: str, engine_id: str,
              **overrides: object) -> EngineCore:
    settings: dict[str, object] = dict(block_size=BLOCK, kv_cache_bytes=KV_CACHE_BYTES)
    settings.update(overrides)
    config = EngineRoleConfig(model=str(model_dir), kv_master=address, engine_id=engine_id,
                              **settings)  # type: ignore[arg-type]
    return EngineCore(config, role, load_model(config.model), pool_client(address))


def metric(core: EngineCore, name: str) -> float | None:
    """One series of the core's registry, e.g. "pantry_engine_requests_total"."""
    labels = {"role": core.description.role, "engine_id": core.config.engine_id}
    return core.metrics.registry.get_sample_value(name, labels)


def block_object_bytes(core: EngineCore) -> int:
    """Size of one block as stored in the pool: header + the KV of every layer."""
    kv = core.runner.kv
    shape = (kv.num_layers, 2, kv.block_size, kv.num_kv_heads, kv.head_dim)
    return encoded_size(core.description.fingerprint, str(kv.dtype).removeprefix("torch."),
                        shape, kv.block_nbytes)


def prompt(length: int, seed: int) -> tuple[int, ...]:
    """Token ids that avoid pad (0), bos (1) and eos (2)."""
    rng = random.Random(seed)
    return tuple(rng.randrange(3, VOCAB) for _ in range(length))


@cache
def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@cache
def _hf_greedy(path: str, ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    model = _hf_model(path)
    with torch.no_grad():
        x = torch.tensor([ids])
        # An explicit mask: otherwise transformers masks every token equal to the pad id.
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return tuple(out[0, len(ids):].tolist())


def hf_greedy(model_dir: Path, ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    """transformers' greedy continuation of `ids`, exactly `n` tokens."""
    return _hf_greedy(str(model_dir), tuple(ids), n)
