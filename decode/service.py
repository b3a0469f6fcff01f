"""The DecodeEngine gRPC servicer: proto in, domain call, streamed proto out."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import grpc

from engine.errors import EngineError
from engine.role_config import EngineRoleConfig
from engine.role_server import build_core, create_server, serve_on_main_thread
from pantry.common.errors import InvalidRequest
from pantry.common.wire import info_to_proto, load_to_proto, sampling_from_proto
from pantry.v1 import engine_pb2, engine_pb2_grpc

from .config import DecodeLimits
from .engine import DecodeEngine, EngineStopped, QueueFull
from .sequence import DecodeJob

SERVICE_NAME = "pantry.v1.DecodeEngine"
# The loop gives up the GIL around every kernel and torch op, and the process's other threads
# (a pull copying and checking blocks, gRPC streaming tokens) take it; Python lets a holder keep
# it for up to the switch interval (5 ms by default) once the loop asks for it back, and a step
# asks hundreds of times. bench/interference.py, decode on a core of its own while 2k-4k-token
# prompts arrive: decode steps that waited more than 8 ms for the GIL, 11 -> 3-4 of ~2,500;
# p99/p50 TBT 1.59 -> 1.51-1.52.
GIL_SWITCH_INTERVAL_S = 0.0002


class DecodeServicer(engine_pb2_grpc.DecodeEngineServicer):
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine

    def Info(self, request: engine_pb2.EngineInfoRequest, context: grpc.ServicerContext) -> engine_pb2.EngineInfo:  # noqa: N802,E501
        return info_to_proto(self.engine.core.description)

    def Load(self, request: engine_pb2.EngineLoadRequest, context: grpc.ServicerContext) -> engine_pb2.EngineLoad:  # noqa: N802,E501
        waiting, running = self.engine.load()
        return load_to_proto(self.engine.core.load(waiting=waiting, running=running))

    def Decode(self, request: engine_pb2.DecodeRequest, context: grpc.ServicerContext) -> Iterator[engine_pb2.DecodeChunk]:  # noqa: N802,E501
        try:
            job = DecodeJob(
                request_id=request.request_id or uuid.uuid4().hex,
                token_ids=tuple(request.token_ids),
                tenant=request.tenant,
                sampling=sampling_from_proto(request.sampling),
                first_token=request.first_token if request.HasField("first_token") else None,
            )
            handle = self.engine.submit(job)
        except QueueFull as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineStopped as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (InvalidRequest, EngineError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # A client that goes away frees the sequence's blocks at the next step.
        context.add_callback(handle.cancel)
        for event in handle.events():
            if event.error:
                context.abort(grpc.StatusCode.INTERNAL, event.error)
            yield engine_pb2.DecodeChunk(
                token_ids=list(event.token_ids),
                finish_reason=event.finish_reason,
                pool_tokens=event.pool_tokens,
                computed_tokens=event.computed_tokens,
            )


def run(config: EngineRoleConfig, limits: DecodeLimits) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    core = build_core(config, "decode")
    engine = DecodeEngine(core, limits, background=False)
    server, port = create_server(
        config,
        lambda s: engine_pb2_grpc.add_DecodeEngineServicer_to_server(DecodeServicer(engine), s),
        [SERVICE_NAME],
    )
    # The loop runs here, on the main thread, until SIGINT/SIGTERM asks it to stop.
    serve_on_main_thread(server, port, core, loop=engine.run, request_stop=engine.request_stop)
    engine.stop()
    core.close()
    return 0
