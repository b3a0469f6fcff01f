"""Start-up shared by the engine roles: model, pool client, core, grpc and metrics servers,
shutdown."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import grpc
import torch

from kvstore.auth import load_token
from kvstore.client import KVStoreClient
from pantry.common.errors import ConfigError
from pantry.common.metrics import MetricsServer
from pantry.common.serving import create_grpc_server, write_ready_file

from . import cpu_pool
from .cpu_split import AdaptiveCpus, CpuBoard
from .loader import load_model
from .role_config import EngineRoleConfig
from .role_core import EngineCore

log = logging.getLogger(__name__)


def build_core(config: EngineRoleConfig, role: str) -> EngineCore:
    every = sorted(os.sched_getaffinity(0))
    if config.cpu_board and not set(config.cpus) <= set(every):
        raise ConfigError(f"cpus: {list(config.cpus)} are not all CPUs this process may use "
                          f"({every})")
    pinned = bool(config.cpus) and not config.cpu_board
    if pinned:
        # Its own cores, as a disaggregated engine has its own machine: another role's work
        # cannot preempt this one's spinning OpenMP threads.
        os.sched_setaffinity(0, config.cpus)
    # With a board the engine starts on every CPU; its first step confines it if need be.
    threads = config.threads or (len(config.cpus) if pinned else
                                 len(every) if config.cpu_board else 0)
    if threads:
        torch.set_num_threads(threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device} asked for, but torch sees no CUDA device "
                          "here; use --device cpu")
    # Prefill computes prompts, whose inputs are too many rows for the few-row linears: the
    # copy they keep (~540 MB on SmolLM2) would only take memory there.
    loaded = load_model(config.model, dtype=getattr(torch, config.dtype), device=config.device,
                        few_rows=role != "prefill")
    token = load_token(config.token_file) if config.token_file else None
    pool = KVStoreClient(config.kv_master, token=token)
    core = EngineCore(config, role, loaded, pool)
    if config.cpu_board:
        core.cpus = AdaptiveCpus(CpuBoard(config.cpu_board, config.cpu_board_slot),
                                 own=config.cpus, every=every, threads=config.threads,
                                 background_away=role == "decode",
                                 on_switch=core.metrics.cpu_switches.inc)
        if role == "decode" and cpu_pool.available():
            core.metrics.watch_far_helpers(cpu_pool.far_helped_blocks)
    split = core.cpus
    core.metrics.compute_cpus.set_function(
        lambda: split.cpus_in_use if split is not None else len(os.sched_getaffinity(0)))
    # The pool client's own series (objects refused by the read checks, transports) belong on
    # the engine's /metrics: a registry is itself a collector.
    core.metrics.registry.register(pool.metrics.registry)
    log.info(
        "%s engine %s: model %s, %d KV blocks of %d tokens, context %d",
        role, config.engine_id, loaded.model_id, core.runner.allocator.num_free,
        config.block_size, core.max_model_len,
    )
    return core


def create_server(
    config: EngineRoleConfig, register: Callable[[grpc.Server], None], service_names: list[str]
) -> tuple[grpc.Server, int]:
    server, port, _ = create_grpc_server(config.host, config.port, register, service_names)
    return server, port


def start_metrics(core: EngineCore) -> MetricsServer:
    metrics = MetricsServer(core.metrics.registry, core.config.host, core.config.metrics_port)
    log.info("metrics on %s", metrics.url)
    return metrics


def serve_on_main_thread(
    server: grpc.Server, port: int, core: EngineCore,
    loop: Callable[[], None], request_stop: Callable[[], None],
) -> None:
    """Serves while `loop` runs on this (the main) thread; SIGINT/SIGTERM call `request_stop`,
    `loop` returns, and the server stops with a grace period."""
    config = core.config
    server.start()
    metrics = start_metrics(core)
    address = f"{config.host}:{port}"
    log.info("serving on %s", address)

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        request_stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    write_ready_file(config.ready_file, address, metrics=metrics.url)
    try:
        loop()
    finally:
        server.stop(grace=2).wait()
        metrics.close()
