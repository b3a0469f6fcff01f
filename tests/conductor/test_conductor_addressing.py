"""The conductor names blocks as its engines do, salt included (engines started with --salt
would otherwise never be matched)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from conductor.conductor import Conductor
from conductor.config import ConductorConfig
from conductor.engines import DecodeClient, PrefillClient
from conductor.fleet import Fleet
from conductor.scheduler import EngineState
from kvstore.client import KVStoreClient
from kvstore.hashing import PoolAddressing
from tests.conductor.fakes import description


def salted_conductor_keys(salt: str, tokens: tuple[int, ...]) -> list[str]:
    async def build() -> list[str]:
        p = replace(description("prefill", "p0"), salt=salt)
        d = replace(description("decode", "d0"), salt=salt)
        fleet = Fleet([EngineState(PrefillClient("127.0.0.1:9", 1.0), p)],
                      [EngineState(DecodeClient("127.0.0.1:9", 1.0), d)],
                      KVStoreClient("127.0.0.1:9"))
        config = ConductorConfig(model="unused", kv_master="127.0.0.1:9",
                                 prefill=("127.0.0.1:9",), decode=("127.0.0.1:9",))
        return Conductor(config, None, fleet).addressing.block_keys(tokens, "")
    return asyncio.run(build())


def test_conductor_block_keys_carry_the_engines_salt() -> None:
    info = description("prefill", "p0")
    tokens = tuple(range(3, 3 + 2 * info.block_size))
    engine = PoolAddressing(info.fingerprint, info.block_size, hash_seed=info.hash_seed,
                            salt="deploy-a")
    keys = salted_conductor_keys("deploy-a", tokens)
    assert keys == engine.block_keys(tokens, "") and len(keys) == 2
    assert salted_conductor_keys("", tokens) != keys
