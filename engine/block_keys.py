"""A sequence's block keys, carried forward as it grows: each new full block costs one hash of
its own tokens, never a re-hash of the sequence from the root."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.hashing import BlockHasher


class KeyChain:
    def __init__(self, hasher: BlockHasher, tokens: Sequence[int]) -> None:
        self._hasher = hasher
        self.keys: list[str] = hasher.block_keys(tokens)

    def append(self, block: Sequence[int]) -> str:
        """The key of the next full block, given its tokens."""
        key = self._hasher.extend(self.keys[-1] if self.keys else None, block)
        self.keys.append(key)
        return key

    def tail_key(self, tokens: Sequence[int]) -> str | None:
        """The tail key of `tokens`' partial last block (None: they fill whole blocks). The
        chain's leading keys must be those of `tokens`' full blocks, as when it was built from
        them (or from tokens they begin)."""
        bs = self._hasher.block_size
        full = len(tokens) // bs
        if full * bs == len(tokens):
            return None
        assert len(self.keys) >= full, f"the chain has {len(self.keys)} keys, {full} needed"
        return self._hasher.tail_key(self.keys[full - 1] if full else None, tokens[full * bs :])
