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
