"""The engine-local prefix cache's block pool, held to vLLM v1's BlockPool behaviour: fresh blocks
from the head of the free queue, freed blocks to its tail with their keys kept, a hit taken back
out of the queue, the least recently freed cached block evicted first."""

from __future__ import annotations

import pytest

from engine.block_keys import KeyChain
from engine.block_manager import BlockPool
from engine.errors import OutOfBlocks
from kvstore.hashing import BlockHasher


def test_fresh_pool_hands_out_ids_in_order_and_refuses_what_it_lacks() -> None:
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free == 3
    with pytest.raises(OutOfBlocks):
        pool.allocate(4)
    assert pool.num_free == 3  # a refused allocation takes nothing


def test_freed_blocks_queue_behind_the_never_used_ones() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    pool.free(reversed(a))          # a sequence frees its tail first
    assert pool.num_free == 6
    assert pool.allocate(6) == [3, 4, 5, 2, 1, 0]


def test_cached_blocks_survive_free_and_are_taken_back_by_a_hit() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    pool.cache("k0", a[0])
    pool.cache("k1", a[1])
    pool.free(reversed(a))
    assert (pool.num_free, pool.num_cached) == (6, 2)
    assert pool.cached_prefix(["k0", "k1", "k2"]) == [0, 1]
    assert pool.cached_prefix(["k1"]) == [1]       # a key names its whole prefix
    assert pool.cached_prefix(["x", "k0"]) == []   # only a leading run counts
    assert pool.unreferenced([0, 1]) == 2
    pool.touch([0, 1])
    assert (pool.num_free, pool.ref_count(0), pool.ref_count(2)) == (4, 1, 0)
    # The hits left the queue; what remains is 3, 4, 5, then the freed tail block 2.
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert pool.evictions == 0


def test_eviction_takes_the_least_recently_freed_cached_block_first() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(2), pool.allocate(2)
    for key, block_id in (("a0", first[0]), ("a1", first[1]), ("b0", second[0]),
                          ("b1", second[1])):
        pool.cache(key, block_id)
    pool.free(reversed(first))   # queue: 1 (a1), 0 (a0)
    pool.free(reversed(second))  # queue: 1, 0, 3 (b1), 2 (b0)
    assert pool.allocate(1) == [1]
    assert (pool.evictions, pool.cached_prefix(["a0", "a1"])) == (1, [0])
    # A hit refreshes nothing until it is freed again: then it goes to the tail.
    pool.touch([0])
    pool.free([0])               # queue: 3, 2, 0
    assert pool.allocate(2) == [3, 2]
    assert pool.cached_prefix(["b0"]) == [] and pool.cached_prefix(["a0"]) == [0]
    assert pool.evictions == 3


def test_shared_blocks_count_references() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.cache("k", block)
    pool.touch([block])          # a second sequence shares it
    pool.free([block])
    assert (pool.ref_count(block), pool.num_free) == (1, 3)
    pool.free([block])
    assert (pool.ref_count(block), pool.num_free) == (0, 4)
    with pytest.raises(ValueError, match="twice"):
        pool.free([block])
    with pytest.raises(ValueError, match="duplicate"):
        pool.free([1, 1])


def test_a_key_names_one_block() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache("k", a) is True
    assert pool.cache("k", a) is True    # indexing the same block again is a no-op
    assert pool.cache("k", b) is False   # computed twice: the first block keeps the key
    pool.free([b, a])
    assert pool.cached_prefix(["k"]) == [a]
    assert pool.allocate(3) == [2, 3, b]   # b was never indexed: reused without an eviction
    assert pool.evictions == 0


def test_key_chain_carries_the_hash_forward() -> None:
    hasher = BlockHasher("model=test;tenant=;salt=", block_size=16)
    tokens = list(range(40))
    chain = KeyChain(hasher, tokens[:20])
    assert chain.keys == ["c579f7442a0237f170cdf5d8d9de02bd"]  # docs/ARCHITECTURE.md's vector
    assert chain.append(tokens[16:32]) == "1f2b21c33004a9004124bb2adf0bcd5f"
    assert chain.keys == hasher.block_keys(tokens)
    with pytest.raises(ValueError, match="a block has 16 tokens, got 8"):
        chain.append(tokens[32:40])
