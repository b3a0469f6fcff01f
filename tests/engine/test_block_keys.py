"""KeyChain: the full-block keys carried forward, and the tail key of a partial last block."""

from __future__ import annotations

from engine.block_keys import KeyChain
from kvstore.hashing import BlockHasher, make_namespace


def test_tail_key_of_the_chains_tokens() -> None:
    h = BlockHasher(make_namespace("test"), block_size=16, seed=0)
    tokens = list(range(40))
    chain = KeyChain(h, tokens)
    assert chain.keys == h.block_keys(tokens)
    # The pinned vector of tests/kvstore/test_hashing.py: tokens 32..39 after block 1.
    assert chain.tail_key(tokens) == "48fe41a46552230c6c80332b424b6b06"
    assert chain.tail_key(tokens[:32]) is None  # whole blocks: no tail
    assert chain.tail_key(tokens[:7]) == h.tail_key(None, tokens[:7])
    assert chain.tail_key(tokens[:31]) == h.tail_key(chain.keys[0], tokens[16:31])
    # Grown by output, the chain still names the prompt's tail by the prompt's own blocks.
    output = list(range(100, 108))
    chain.append(tokens[32:40] + output)
    assert len(chain.keys) == 3
    assert chain.tail_key(tokens) == "48fe41a46552230c6c80332b424b6b06"
    assert chain.tail_key(tokens) not in chain.keys
