"""PantryConnector: vLLM's KV connector (KVConnectorBase_V1, vLLM 0.32) on Pantry's KV pool.

The only module of Pantry that imports vLLM, with its `connectors.vllm_metrics`. vLLM loads it
by module path:

    --kv-transfer-config '{"kv_connector": "PantryConnector",
        "kv_connector_module_path": "connectors.vllm_connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"kv_master": "127.0.0.1:7000"}}'

(`pantry vllm-serve` writes that line.) Extra config: `kv_master` (required), `tenant` (""),
`hash_seed` (0), `token_file` (the pool's service token; $PANTRY_TOKEN_FILE when unset),
`rpc_timeout_s` (2.0), `retry_after_s` (5.0: how long a failed pool is not asked),
`max_pending_save_bytes` (512 MiB), `load_staging_bytes` (32 MiB: the worker's reused buffer
that pool reads land in), `model_digest` (override the digest of the model's files).
PANTRY_CONNECTOR_TRACE=1 in vLLM's environment logs each lookup, load and save with its times.

What is stored: one pool object per vLLM block, all layers, the pages copied as the attention
backend keeps them (`connectors.vllm_pages`: the CPU backend's page is not token-major, so
blocks are opaque and only vLLM instances of the same layout fingerprint read them). Keys follow
DESIGN section 3 with vLLM's block size; namespace = layout fingerprint, tenant, `cache_salt`.

How the hooks are used:
- scheduler: `get_num_new_matched_tokens` asks the master for the longest stored prefix of the
  prompt's full blocks (at most prompt - 1 tokens); `update_state_after_alloc` records which
  vLLM blocks to fill; `build_connector_meta` hands the worker this step's loads and the blocks
  this step completes (prompt blocks the pool did not have); `request_finished` forgets.
- worker: `start_load_kv` reads the blocks from the locations the scheduler's lookup returned
  (handed over in the step's metadata: one master round trip per hit, not two), verifies them
  (key, layout, length, checksum) and copies them in before the forward (`connectors.
  vllm_loader`; loads are synchronous, so `wait_for_layer_load` has nothing to wait for); a
  block that is missing or refused is reported by
  `get_block_ids_with_load_errors` and vLLM recomputes from it (the connector sets
  kv_load_failure_policy=recompute: a pool failure never fails a request). `save_kv_layer` does
  nothing: on CPU the layers run on this thread, so a per-layer copy would overlap nothing; after
  the forward `wait_for_save` copies the completed blocks' pages out (the only time it holds the
  step) and a background thread puts them. `get_kv_connector_stats` reports what moved
  (`connectors.vllm_metrics`: vllm:pantry_*_total on vLLM's /metrics).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from connectors.pool_breaker import PoolBreaker
from connectors.vllm_addressing import VllmAddressing, VllmLayout, model_digest
from connectors.vllm_loader import PoolLoader, select
from connectors.vllm_metrics import PantryConnectorStats, PantryPromMetrics
from connectors.vllm_pages import PagedKV
from connectors.vllm_saver import BackgroundSaver
from kvstore.auth import load_token
from kvstore.client import KVStoreClient, PrefixMatch
from kvstore.config import ClientConfig
from pantry.common.errors import ConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
# vLLM configures only its own loggers; the connector's lines go where vLLM's go.
if not logging.getLogger("connectors").handlers:
    logging.getLogger("connectors").handlers = list(logging.getLogger("vllm").handlers)
    logging.getLogger("connectors").setLevel(logging.INFO)
    logging.getLogger("connectors").propagate = False

# PANTRY_CONNECTOR_TRACE=1: one log line per hook call that did work, with its phases' times.
_TRACE = os.environ.get("PANTRY_CONNECTOR_TRACE") == "1"


@dataclass(frozen=True)
class BlockTransfer:
    req_id: str
    keys: tuple[str, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlockLoad:
    """Blocks to fill from the pool: where the scheduler's lookup found them (leased for the
    master's lease_ms, so the worker reads them in this step without asking the master)."""

    req_id: str
    match: PrefixMatch
    block_ids: tuple[int, ...]


@dataclass
class PantryConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _Tracked:
    """A request as the scheduler side follows it."""

    request: Request  # vLLM's, alive until request_finished; its tokens grow as it generates
    keys: tuple[str, ...]  # of its full blocks so far (prompt, then generated)
    saved: int  # blocks [0, saved) are in the pool or already handed to the worker to save
    block_ids: list[int] = field(default_factory=list)
    hit_tokens: int = 0
    match: PrefixMatch | None = None

    @property
    def req_id(self) -> str:
        return str(self.request.request_id)


def _extra(config: VllmConfig, name: str, default: Any) -> Any:
    return config.kv_transfer_config.get_from_extra_config(name, default)


def layout_of(config: VllmConfig, kv_cache_config: KVCacheConfig) -> VllmLayout:
    """The layout both sides derive from the config alone, so they name blocks alike."""
    import vllm
    from vllm.platforms import current_platform

    par = config.parallel_config
    if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
        raise ConfigError("PantryConnector supports tensor and pipeline parallel size 1 only")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError("PantryConnector supports models with one KV cache group only")
    spec = groups[0].kv_cache_spec
    model = config.model_config
    return VllmLayout(
        model_digest=_extra(config, "model_digest", None) or model_digest(model.model),
        vllm_version=vllm.__version__,
        backend=f"{current_platform.device_type}:{config.attention_config.backend}",
        dtype=str(spec.dtype).removeprefix("torch."),
        block_size=spec.block_size,
        num_layers=len(groups[0].layer_names),
        num_kv_heads=getattr(spec, "num_kv_heads", 0),
        head_size=getattr(spec, "head_size", 0),
    )


class PantryConnector(KVConnectorBase_V1):  # type: ignore[misc]
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        master = _extra(vllm_config, "kv_master", None)
        if not master:
            raise ConfigError("PantryConnector needs kv_connector_extra_config.kv_master")
        layout = layout_of(vllm_config, kv_cache_config)
        self.block_size = layout.block_size
        self.fingerprint = layout.fingerprint()
        self.addressing = VllmAddressing(self.fingerprint, layout.block_size,
                                         tenant=str(_extra(vllm_config, "tenant", "")),
                                         hash_seed=int(_extra(vllm_config, "hash_seed", 0)))
        self.breaker = PoolBreaker(float(_extra(vllm_config, "retry_after_s", 5.0)))
        token_file = _extra(vllm_config, "token_file", None)
        token = load_token(token_file) if token_file else None  # None: $PANTRY_TOKEN_FILE
        self.client = KVStoreClient(
            master, token=token,
            config=ClientConfig(rpc_timeout_s=float(_extra(vllm_config, "rpc_timeout_s", 2.0))))
        self._num_blocks = kv_cache_config.num_blocks
        self._max_pending = int(_extra(vllm_config, "max_pending_save_bytes", 512 << 20))
        self._staging_bytes = int(_extra(vllm_config, "load_staging_bytes", 32 << 20))
        # scheduler side
        self._tracked: dict[str, _Tracked] = {}
        self._loads: list[BlockLoad] = []
        # worker side
        self._paged: PagedKV | None = None
        self._loader: PoolLoader | None = None
        self._saver: BackgroundSaver | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._stats = PantryConnectorStats()
        self._saver_reported = (0, 0)  # the saver's (stored, dropped) already in stats
        if role == KVConnectorRole.SCHEDULER:
            # A block the pool cannot give back is recomputed, never a failed request. The
            # scheduler reads this policy just after constructing its connector.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        log.info("PantryConnector (%s) on pool %s, layout %s (%s)", role.name, master,
                 self.fingerprint, layout)

    # ---- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        t0 = time.perf_counter()
        pk = self.addressing.prompt_keys(prompt, request.cache_salt)
        t1 = time.perf_counter()
        match = None
        if pk.keys and self.breaker.allows():
            try:
                match = self.client.match_prefix(list(pk.keys))
                self.breaker.succeeded()
            except Exception as e:  # the pool is an accelerator: down means compute
                self.breaker.failed("lookup", e)
        matched = 0 if match is None else match.matched
        if _TRACE:
            log.info("trace %.3f match %s: %d tokens, %d/%d blocks, hash %.1f ms, match %.1f "
                     "ms", time.time() % 1000, request.request_id, len(prompt), matched,
                     len(pk.keys), 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1))
        tracked = _Tracked(request, pk.keys, saved=matched, match=match)
        hit = min(matched, pk.max_hit_blocks) * self.block_size
        tracked.hit_tokens = hit
        self._tracked[request.request_id] = tracked
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        tracked = self._tracked.get(request.request_id)
        if num_external_tokens <= 0 or tracked is None:
            return
        assert tracked.match is not None, "a hit comes from a match"
        block_ids = blocks.get_block_ids()[0]
        end = tracked.hit_tokens // self.block_size
        start = (tracked.hit_tokens - num_external_tokens) // self.block_size
        assert (tracked.hit_tokens - num_external_tokens) % self.block_size == 0
        self._loads.append(BlockLoad(tracked.req_id, select(tracked.match, range(start, end)),
                                     tuple(block_ids[start:end])))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PantryConnectorMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._add_saves(meta, tracked, new.num_computed_tokens + scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            self._add_saves(meta, tracked, cached.num_computed_tokens[i] + scheduled[req_id])
        return meta

    def _add_saves(self, meta: PantryConnectorMetadata, tracked: _Tracked,
                   computed_after_step: int) -> None:
        """The blocks this step completes that the pool does not have yet: the prompt's, then
        those generated tokens fill (keyed on the same chain, so a later prompt that repeats
        prompt and answer hits them)."""
        upto = min(computed_after_step // self.block_size, len(tracked.block_ids))
        if upto > len(tracked.keys):
            tokens = tracked.request.all_token_ids[: upto * self.block_size]
            tracked.keys = tuple(self.addressing.hasher(tracked.request.cache_salt)
                                 .block_keys(tokens))
        upto = min(upto, len(tracked.keys))
        if upto > tracked.saved:
            meta.saves.append(BlockTransfer(tracked.req_id, tracked.keys[tracked.saved:upto],
                                            tuple(tracked.block_ids[tracked.saved:upto])))
            tracked.saved = upto

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        return False, None

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = PagedKV(kv_caches, self._num_blocks, self.fingerprint)
        self._loader = PoolLoader(self.client, self._paged, self._staging_bytes)
        self._saver = BackgroundSaver(self.client, self._paged.layout, self.breaker,
                                      self._max_pending, self._paged.new_pages)
        log.info("PantryConnector: %d layers, %d-byte pages of %s, %d bytes per block",
                 self._paged.num_layers, self._paged.page_nbytes, self._paged.dtype,
                 self._paged.block_nbytes)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PantryConnectorMetadata)
        self._failed_reqs = {load.req_id for load in meta.loads if not self._load(load)}

    def _load(self, load: BlockLoad) -> bool:
        """Whether every block of the load is in place."""
        assert self._loader is not None, "register_kv_caches was not called"
        t0 = time.perf_counter()
        try:
            got = self._loader.load(load.match, load.block_ids)
        except Exception as e:
            self.breaker.failed("read", e)
            self._load_errors.update(load.block_ids)
            self._stats.add("failed_blocks", len(load.block_ids))
            return False
        for name, value in (("loaded_blocks", got.loaded), ("failed_blocks", len(got.failed)),
                            ("load_bytes", got.nbytes),
                            ("load_seconds", time.perf_counter() - t0)):
            self._stats.add(name, value)
        if _TRACE:
            log.info("trace %.3f load %s: %d blocks, %d bytes in %.1f ms, transports %s",
                     time.time() % 1000, load.req_id, got.loaded, got.nbytes,
                     1e3 * (time.perf_counter() - t0),
                     sorted({self.client.transport_name(n) for n in load.match.nodes}))
        if got.failed:
            self._load_errors.update(got.failed)
            log.warning("%d of %d pool blocks missing or refused; vLLM recomputes them",
                        len(got.failed), len(load.block_ids))
        if got.damaged:
            try:
                self.client.remove(got.damaged)
            except Exception as e:
                self.breaker.failed("remove", e)
        return not got.failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # wait_for_save copies every layer of the completed blocks at once

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, PantryConnectorMetadata)
        if _TRACE and meta.loads:
            log.info("trace %.3f forward done", time.time() % 1000)
        if not meta.saves or self._paged is None or self._saver is None:
            return
        # A request whose load failed ran this forward on blocks vLLM will recompute: what it
        # computed after them is not stored.
        saves = [s for s in meta.saves if s.req_id not in self._failed_reqs]
        self._failed_reqs = set()
        keys = tuple(k for s in saves for k in s.keys)
        ids = [b for s in saves for b in s.block_ids]
        if not keys:
            return
        t0 = time.perf_counter()
        paged = self._paged
        try:
            self._saver.submit(keys, lambda out: paged.gather(ids, out), paged.block_nbytes)
        except Exception:  # a save that cannot be made is a later miss, never a failed step
            log.exception("saving %d blocks failed; they are not stored", len(keys))
        if _TRACE:
            log.info("trace %.3f save: %d blocks gathered in %.1f ms", time.time() % 1000, len(ids),
                     1e3 * (time.perf_counter() - t0))

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._saver is not None:
            stored, dropped = self._saver.stored, self._saver.dropped
            self._stats.add("saved_blocks", stored - self._saver_reported[0])
            self._stats.add("dropped_blocks", dropped - self._saver_reported[1])
            self._saver_reported = (stored, dropped)
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, PantryConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return PantryConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return PantryPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._saver is not None:
            self._saver.flush(5.0)
            self._saver.close()
        self.client.close()
