"""The roles a conductor serves through: engine clients, their last reported load, the pool."""

from __future__ import annotations

import asyncio
import time

from kvstore.auth import load_token
from kvstore.client import KVStoreClient
from kvstore.metadata import PoolStatus
from pantry.common.engine_info import EngineDescription
from pantry.common.errors import Unavailable

from .config import ConductorConfig
from .engines import DecodeClient, PrefillClient
from .scheduler import EngineState

LOAD_POLL_S = 1.0
# A Load answer is a counter read: an engine slower than this is as good as down for placement,
# and one slow engine must not delay the view of the others (they are asked all at once).
LOAD_TIMEOUT_S = 1.0


class Fleet:
    def __init__(
        self,
        prefills: list[EngineState[PrefillClient]],
        decodes: list[EngineState[DecodeClient]],
        pool: KVStoreClient,
    ) -> None:
        assert prefills and decodes
        self.prefills = prefills
        self.decodes = decodes
        self.pool = pool
        self.pool_up = True
        self.pool_status: PoolStatus | None = None

    @property
    def reference(self) -> EngineDescription:
        return self.prefills[0].info

    @classmethod
    async def connect(cls, config: ConductorConfig, wait_s: float) -> Fleet:
        """Waits for every engine to describe itself and checks they all share one KV layout:
        mixing layouts would make blocks written by one unreadable (or wrong) for another."""
        prefills = [PrefillClient(a, config.engine_timeout_s) for a in config.prefill]
        decodes = [DecodeClient(a, config.engine_timeout_s) for a in config.decode]
        deadline = time.monotonic() + wait_s

        async def info_of(client: PrefillClient | DecodeClient) -> EngineDescription:
            while True:
                try:
                    return await client.info()
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise Unavailable(f"engine {client.address} did not answer: {exc}") from exc
                    await asyncio.sleep(0.2)

        p_infos = list(await asyncio.gather(*(info_of(c) for c in prefills)))
        d_infos = list(await asyncio.gather(*(info_of(c) for c in decodes)))
        ref = p_infos[0]
        clients: list[PrefillClient | DecodeClient] = [*prefills, *decodes]
        for client, info in zip(clients, p_infos + d_infos, strict=True):
            if (info.fingerprint, info.block_size, info.hash_seed, info.salt) != (
                ref.fingerprint, ref.block_size, ref.hash_seed, ref.salt
            ):
                raise Unavailable(
                    f"engine {client.address} serves another model or KV layout than "
                    f"{prefills[0].address}; start every engine with the same model, block "
                    "size and salt"
                )
        token = load_token(config.token_file) if config.token_file else None
        pool = await asyncio.to_thread(KVStoreClient, config.kv_master, token=token)
        return cls(
            [EngineState(c, i) for c, i in zip(prefills, p_infos, strict=True)],
            [EngineState(c, i) for c, i in zip(decodes, d_infos, strict=True)],
            pool,
        )

    async def close(self) -> None:
        for p in self.prefills:
            await p.client.close()
        for d in self.decodes:
            await d.client.close()
        self.pool.close()

    async def poll_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(LOAD_POLL_S)

    async def refresh(self) -> dict[str, bool]:
        """Asks every role for its load, all at once; returns which answered."""
        engines: list[EngineState[PrefillClient] | EngineState[DecodeClient]] = [
            *self.prefills, *self.decodes
        ]

        async def poll(st: EngineState[PrefillClient] | EngineState[DecodeClient]) -> None:
            try:
                st.load = await asyncio.wait_for(st.client.load(timeout=LOAD_TIMEOUT_S),
                                                 LOAD_TIMEOUT_S)
                st.up = True
            except Exception:
                st.up = False

        async def pool_status() -> None:
            try:
                self.pool_status = await asyncio.wait_for(
                    asyncio.to_thread(self.pool.status), LOAD_TIMEOUT_S)
                self.pool_up = True
            except Exception:
                self.pool_up = False

        await asyncio.gather(*(poll(st) for st in engines), pool_status())
        up = {f"{st.info.role}:{st.info.engine_id}": st.up for st in engines}
        up["kvstore"] = self.pool_up
        return up
