"""Runs the conductor: gRPC Generation and the OpenAI HTTP API on one event loop."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web

from pantry.common.serving import add_health_and_reflection, grpc_options, write_ready_file

from .conductor import Conductor
from .config import ConductorConfig
from .grpc_api import SERVICE_NAME, GenerationServicer, add_to_server
from .http_api import create_app

log = logging.getLogger(__name__)


async def serve(config: ConductorConfig) -> None:
    conductor = await Conductor.connect(config)
    server = grpc.aio.server(options=grpc_options())
    add_to_server(GenerationServicer(conductor), server)
    add_health_and_reflection(server, [SERVICE_NAME])
    grpc_port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    await server.start()
    runner = web.AppRunner(create_app(conductor), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    grpc_address = f"{config.host}:{grpc_port}"
    http_address = f"{config.host}:{http_port}"
    metrics_url = f"http://{http_address}/metrics"
    log.info("serving gRPC on %s, HTTP on http://%s (model %s), metrics at %s",
             grpc_address, http_address, conductor.model_id, metrics_url)
    write_ready_file(config.ready_file, grpc_address, http=http_address,
                     model=conductor.model_id, metrics=metrics_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await server.stop(grace=2)
    await conductor.close()


def run(config: ConductorConfig) -> int:
    asyncio.run(serve(config))
    return 0
