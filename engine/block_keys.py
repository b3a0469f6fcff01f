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
        h = self._hasher
        assert len(block) == h.block_size, f"a block has {h.block_size} tokens, got {len(block)}"
        prev = bytes.fromhex(self.keys[-1]) if self.keys else h.root()
        # The chain step is BlockHasher's own (kvstore.hashing): the same digest and packing as
        # block_keys, started from the last known key instead of the root.
        key = h._digest(prev + h._block_fmt.pack(*block)).hex()
        self.keys.append(key)
        return key
