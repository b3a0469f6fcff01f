"""Block addressing (DESIGN section 3): chained 128-bit hashes of full token blocks, and the tail
key of a prompt's partial last block.

A key names the whole prefix up to and including its block, so equal keys mean equal prefixes
(within a namespace) and a cache lookup is a walk along the key list.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

from kvstore.errors import InvalidTokenError
from pantry.common.errors import ConfigError

_ROOT_TAG = b"pantry-kv-v1\x00"
# A tail key hashes prev + this tag + 4 bytes per token; a full key hashes prev + 4 bytes per
# token. The tag's length is not a multiple of 4, so the two inputs never have the same length
# and a tail key can never be a full block's key, whatever the tokens.
_TAIL_TAG = b"pantry-kv-tail\x00"
assert len(_TAIL_TAG) % 4, "a tail's hashed input must never be as long as a full block's"
_MAX_TOKEN = 2**32
ALGORITHMS = ("xxh3_128", "sha256")
# Tokens per addressed block unless a deployment says otherwise: the one place this is written.
DEFAULT_BLOCK_SIZE = 16


def make_namespace(fingerprint: str, tenant: str = "", salt: str = "") -> str:
    """The namespace string that keeps models, layouts and tenants apart."""
    return f"model={fingerprint};tenant={tenant};salt={salt}"


def _digest_fn(algorithm: str, seed: int) -> Callable[[bytes], bytes]:
    if algorithm == "xxh3_128":
        return lambda data: xxhash.xxh3_128_digest(data, seed)
    if algorithm == "sha256":
        # sha256 has no seed parameter; prefixing the seed keeps deployments with different seeds
        # disjoint just like xxh3's seed does. The full 32-byte digest is chained and used as key
        # (64 hex chars), because truncating would give up the collision resistance it is for.
        seed_bytes = struct.pack("<Q", seed)
        return lambda data: hashlib.sha256(seed_bytes + data).digest()
    raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


class BlockHasher:
    """Computes the chained block keys for one namespace.

    `sha256` option: h[i] = sha256(seed as u64 LE + h[i-1] + tokens), root likewise over the
    root tag; keys are 64 hex chars. `xxh3_128` (default) follows DESIGN section 3 exactly.
    """

    def __init__(
        self,
        namespace: str,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        algorithm: str = "xxh3_128",
    ) -> None:
        if block_size <= 0:
            raise ConfigError(f"block_size must be > 0, got {block_size}")
        if not 0 <= seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {seed}")
        self.namespace = namespace
        self.block_size = block_size
        self.seed = seed
        self.algorithm = algorithm
        self._digest = _digest_fn(algorithm, seed)
        self._root = self._digest(_ROOT_TAG + namespace.encode("utf-8"))
        self._block_fmt = struct.Struct(f"<{block_size}I")

    def root(self) -> bytes:
        return self._root

    def extend(self, prev_key: str | None, block: Sequence[int]) -> str:
        """The key of the full block that follows the block keyed `prev_key` (None: the first
        block): one step of the chain, so a growing sequence never re-hashes from the root."""
        if len(block) != self.block_size:
            raise ValueError(f"a block has {self.block_size} tokens, got {len(block)}")
        prev = bytes.fromhex(prev_key) if prev_key is not None else self._root
        return self._digest(prev + self._pack(block, 0)).hex()

    def tail_key(self, prev_key: str | None, tail: Sequence[int]) -> str:
        """The key of a partial block of exactly `tail` (1 <= len < block_size) that follows the
        full block keyed `prev_key` (None: the prompt has no full block). It names the whole
        prompt, as a full key names its prefix, and never equals a full block's key."""
        if not 0 < len(tail) < self.block_size:
            raise ValueError(
                f"a tail has 1 to {self.block_size - 1} tokens, got {len(tail)}")
        prev = bytes.fromhex(prev_key) if prev_key is not None else self._root
        fmt = struct.Struct(f"<{len(tail)}I")
        return self._digest(prev + _TAIL_TAG + self._pack(tail, None, fmt)).hex()

    def _pack(self, chunk: Sequence[int], index: int | None,
              fmt: struct.Struct | None = None) -> bytes:
        """`chunk` as little-endian uint32s; `index` names the block in errors (None: a tail)."""
        try:
            return (fmt or self._block_fmt).pack(*chunk)
        except struct.error:
            bad = next((t for t in chunk if not 0 <= int(t) < _MAX_TOKEN), None)
            raise InvalidTokenError(
                f"token ids must satisfy 0 <= t < 2**32, got {bad!r} in "
                + ("the tail" if index is None else f"block {index}")
            ) from None

    def block_keys(self, tokens: Sequence[int]) -> list[str]:
        """Hex keys of the full blocks of `tokens`; a trailing partial block has no key."""
        n_full = len(tokens) // self.block_size
        keys: list[str] = []
        prev = self._root
        bs = self.block_size
        for i in range(n_full):
            prev = self._digest(prev + self._pack(tokens[i * bs : (i + 1) * bs], i))
            keys.append(prev.hex())
        return keys


@dataclass(frozen=True)
class PoolAddressing:
    """How this deployment names blocks: the layout fingerprint, hash seed and salt."""

    fingerprint: str
    block_size: int
    hash_seed: int = 0
    salt: str = ""

    def hasher(self, tenant: str) -> BlockHasher:
        namespace = make_namespace(self.fingerprint, tenant=tenant, salt=self.salt)
        return BlockHasher(namespace, block_size=self.block_size, seed=self.hash_seed)

    def block_keys(self, tokens: Sequence[int], tenant: str) -> list[str]:
        return self.hasher(tenant).block_keys(tokens)
