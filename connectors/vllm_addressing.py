"""How a vLLM instance names its blocks in the pool (DESIGN section 3), without importing vLLM.

The layout fingerprint names the engine kind and everything that changes the bytes of a vLLM
block: the model (weights digest), KV dtype, block size, per-layer page shape, attention backend,
vLLM version, tensor-parallel rank and size. It goes into the namespace with the tenant and the
request's `cache_salt`, so vLLM blocks never collide with Pantry-engine blocks (whose fingerprint
names another engine) nor with another model's, and two instances with the same model and layout
compute the same keys and share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kvstore.hashing import BlockHasher, make_namespace

# Bytes sampled at each end and the middle of every weight file for the model digest: two
# fine-tunes of one base share config and file sizes but not these bytes, and a 100 GB model is
# not read whole at start-up.
_SAMPLE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_digest(model: str) -> str:
    """A digest of the model's files: config.json whole, each weight file's name, size and
    sampled bytes. A name that is not a directory (a hub id) is its own identity."""
    path = Path(model)
    h = xxhash.xxh3_128()
    if not path.is_dir():
        h.update(f"name:{model}".encode())
        return h.hexdigest()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            for offset in (0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


@dataclass(frozen=True)
class VllmLayout:
    """What a vLLM instance's KV pages are; equal layouts mean interchangeable blocks."""

    model_digest: str
    vllm_version: str
    backend: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_rank: int = 0
    tp_size: int = 1

    def fingerprint(self) -> str:
        # "vllm" first: Pantry's own engines name themselves otherwise, so the namespaces of the
        # two engine kinds are disjoint whatever the model.
        fields = {"engine": "vllm", **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        return "vllm:" + xxhash.xxh3_128_hexdigest(json.dumps(fields, sort_keys=True).encode())


@dataclass(frozen=True)
class PoolKeys:
    """The keys of a request's full prompt blocks, and how many of them a hit may cover."""

    keys: tuple[str, ...]
    max_hit_blocks: int


class VllmAddressing:
    """Block keys of a vLLM instance: one hasher per (tenant, cache_salt), created on first use."""

    def __init__(self, fingerprint: str, block_size: int, tenant: str = "",
                 hash_seed: int = 0) -> None:
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.tenant = tenant
        self.hash_seed = hash_seed
        self._hashers: dict[str, BlockHasher] = {}

    def hasher(self, cache_salt: str | None) -> BlockHasher:
        salt = cache_salt or ""
        h = self._hashers.get(salt)
        if h is None:
            h = BlockHasher(make_namespace(self.fingerprint, self.tenant, salt),
                            block_size=self.block_size, seed=self.hash_seed)
            if len(self._hashers) < 1024:  # salts are per user: keep the cache bounded
                self._hashers[salt] = h
        return h

    def prompt_keys(self, prompt: Sequence[int], cache_salt: str | None) -> PoolKeys:
        """A hit is full blocks only and leaves at least the prompt's last token to compute, as
        vLLM's own prefix cache does: the first output token needs that token's logits."""
        keys = self.hasher(cache_salt).block_keys(prompt)
        max_hit = max(0, (len(prompt) - 1) // self.block_size)
        return PoolKeys(tuple(keys), min(max_hit, len(keys)))
