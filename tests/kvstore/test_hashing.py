"""Pinned block-key vectors from DESIGN section 3: any change here breaks every stored key."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidTokenError
from kvstore.hashing import BlockHasher, make_namespace
from pantry.common.errors import ConfigError


def test_namespace_format() -> None:
    assert make_namespace("test") == "model=test;tenant=;salt="
    assert make_namespace("fp", "acme", "s1") == "model=fp;tenant=acme;salt=s1"


def test_design_vectors_seed0() -> None:
    h = BlockHasher(make_namespace("test"), block_size=16, seed=0)
    assert h.root().hex() == "a7a39d2381af0855f0dc853e2fadd077"
    assert h.block_keys(list(range(40))) == [
        "c579f7442a0237f170cdf5d8d9de02bd",
        "1f2b21c33004a9004124bb2adf0bcd5f",
    ]


def test_design_vectors_tenant() -> None:
    h = BlockHasher(make_namespace("test", tenant="acme"))
    assert h.block_keys(list(range(40))) == [
        "3d7a31ae2af484731c4c59c6ea738d7f",
        "b5c064c7a51776e414406aa62b625fc7",
    ]


def test_design_vectors_seed42() -> None:
    h = BlockHasher(make_namespace("test"), seed=42)
    assert h.block_keys(list(range(32))) == [
        "eefc01b755909913e8d51c2147c41b8a",
        "b7faacd987087c3a575c7f5dd3acdf63",
    ]


def test_partial_block_has_no_key_and_prefix_property() -> None:
    h = BlockHasher(make_namespace("test"))
    assert h.block_keys(list(range(15))) == []
    full = h.block_keys(list(range(48)))
    assert h.block_keys(list(range(35))) == full[:2]
    # a different token in block 0 changes every later key
    changed = h.block_keys([1] + list(range(1, 48)))
    assert all(a != b for a, b in zip(full, changed, strict=True))


def test_token_range_validated() -> None:
    h = BlockHasher(make_namespace("test"), block_size=2)
    assert len(h.block_keys([0, 2**32 - 1])) == 1
    with pytest.raises(InvalidTokenError, match="2\\*\\*32"):
        h.block_keys([0, 2**32])
    with pytest.raises(InvalidTokenError):
        h.block_keys([-1, 0])


def test_sha256_option() -> None:
    h = BlockHasher(make_namespace("test"), algorithm="sha256")
    keys = h.block_keys(list(range(32)))
    assert len(keys) == 2 and all(len(k) == 64 for k in keys)
    assert keys != BlockHasher(make_namespace("test"), algorithm="sha256", seed=1).block_keys(
        list(range(32))
    )
    with pytest.raises(ConfigError, match="algorithm"):
        BlockHasher("x", algorithm="md5")
    with pytest.raises(ConfigError, match="block_size"):
        BlockHasher("x", block_size=0)


def test_extend_is_one_step_of_the_chain() -> None:
    h = BlockHasher(make_namespace("test"), block_size=16, seed=0)
    first = h.extend(None, list(range(16)))
    assert first == "c579f7442a0237f170cdf5d8d9de02bd"
    assert h.extend(first, list(range(16, 32))) == "1f2b21c33004a9004124bb2adf0bcd5f"
    with pytest.raises(ValueError, match="a block has 16 tokens, got 8"):
        h.extend(first, list(range(8)))
    with pytest.raises(InvalidTokenError, match="got -1 in block 0"):
        h.extend(None, [-1] + list(range(15)))


def test_tail_key_vectors() -> None:
    h = BlockHasher(make_namespace("test"), block_size=16, seed=0)
    full = h.block_keys(list(range(40)))
    # Tokens 32..39 after block 1 (the DESIGN vectors' prompt), and a prompt with no full block.
    assert h.tail_key(full[1], list(range(32, 40))) == "48fe41a46552230c6c80332b424b6b06"
    assert h.tail_key(None, list(range(7))) == "a58e75e53c303ad8af7a76b424bc3d32"
    assert h.tail_key(full[0], list(range(16, 31))) == "684f951513af12334dea70ea204754f0"
    sha = BlockHasher(make_namespace("test"), block_size=16, seed=0, algorithm="sha256")
    assert sha.tail_key(sha.block_keys(list(range(32)))[1], list(range(32, 40))) == (
        "eaa4c6595f719c8b2feccdf699f568ed34812018493c27e1514b885dc62ea156")


def test_tail_key_never_names_a_full_block() -> None:
    h = BlockHasher(make_namespace("test"), block_size=4, seed=0)
    tokens = list(range(3, 15))
    full = h.block_keys(tokens)  # 3 full blocks of 4
    tails = {h.tail_key(prev, tokens[i * 4 : i * 4 + n])
             for i, prev in enumerate([None, *full[:-1]]) for n in (1, 2, 3)}
    assert len(tails) == 9  # each length and position its own key
    assert tails.isdisjoint(full)
    # A second tail length, or another token, is another key; the same tail, the same key.
    assert h.tail_key(full[0], [7, 8]) != h.tail_key(full[0], [7, 8, 9])
    assert h.tail_key(full[0], [7, 8]) != h.tail_key(full[0], [7, 9])
    assert h.tail_key(full[0], [7, 8]) == h.tail_key(full[0], (7, 8))
    # Another tenant's namespace: another key.
    other = BlockHasher(make_namespace("test", tenant="acme"), block_size=4, seed=0)
    assert other.tail_key(None, [7]) != h.tail_key(None, [7])


def test_tail_key_length_and_tokens_validated() -> None:
    h = BlockHasher(make_namespace("test"), block_size=16)
    with pytest.raises(ValueError, match="a tail has 1 to 15 tokens, got 0"):
        h.tail_key(None, [])
    with pytest.raises(ValueError, match="a tail has 1 to 15 tokens, got 16"):
        h.tail_key(None, list(range(16)))
    with pytest.raises(InvalidTokenError, match="got 4294967296 in the tail"):
        h.tail_key(None, [1, 2**32])
    with pytest.raises(InvalidTokenError, match="got -1 in the tail"):
        h.tail_key(None, [-1])
