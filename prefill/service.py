"""The PrefillEngine gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import uuid

import grpc

from engine.errors import EngineError
from engine.role_config import EngineRoleConfig
from engine.role_server import build_core, create_server, serve_on_main_thread
from pantry.common.errors import InvalidRequest
from pantry.common.wire import info_to_proto, load_to_proto, sampling_from_proto
from pantry.v1 import engine_pb2, engine_pb2_grpc

from .config import PrefillLimits
from .engine import PrefillEngine, PrefillJob, PrefillStopped

SERVICE_NAME = "pantry.v1.PrefillEngine"


class PrefillServicer(engine_pb2_grpc.PrefillEngineServicer):
    def __init__(self, engine: PrefillEngine) -> None:
        self.engine = engine

    def Info(self, request: engine_pb2.EngineInfoRequest, context: grpc.ServicerContext) -> engine_pb2.EngineInfo:  # noqa: N802,E501
        return info_to_proto(self.engine.core.description)

    def Load(self, request: engine_pb2.EngineLoadRequest, context: grpc.ServicerContext) -> engine_pb2.EngineLoad:  # noqa: N802,E501
        waiting, running = self.engine.load()
        return load_to_proto(self.engine.core.load(waiting=waiting, running=running))

    def Prefill(self, request: engine_pb2.PrefillRequest, context: grpc.ServicerContext) -> engine_pb2.PrefillResult:  # noqa: N802,E501
        try:
            job = PrefillJob(
                request_id=request.request_id or uuid.uuid4().hex,
                token_ids=tuple(request.token_ids),
                tenant=request.tenant,
                sampling=sampling_from_proto(request.sampling),
            )
            outcome = self.engine.prefill(job)
        except PrefillStopped as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (InvalidRequest, EngineError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return engine_pb2.PrefillResult(
            first_token=outcome.first_token,
            pool_tokens=outcome.pool_tokens,
            computed_tokens=outcome.computed_tokens,
            stored_blocks=outcome.stored_blocks,
        )


def run(config: EngineRoleConfig, limits: PrefillLimits) -> int:
    core = build_core(config, "prefill")
    engine = PrefillEngine(core, limits, background=False)
    server, port = create_server(
        config,
        lambda s: engine_pb2_grpc.add_PrefillEngineServicer_to_server(PrefillServicer(engine), s),
        [SERVICE_NAME],
    )
    # The loop runs here, on the main thread, until SIGINT/SIGTERM asks it to stop.
    serve_on_main_thread(server, port, core, loop=engine.run, request_stop=engine.request_stop)
    engine.stop()
    core.close()
    return 0
