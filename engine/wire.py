"""Protobuf <-> domain conversions shared by the two engine servicers (the edge)."""

from __future__ import annotations

from engine.role_core import EngineCounters, EngineDescription
from engine.sampling import SamplingParams
from proto.pantry.v1 import common_pb2, engine_pb2


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        ignore_eos=msg.ignore_eos,
        stop_token_ids=tuple(msg.stop_token_ids),
    )


def info_to_proto(desc: EngineDescription) -> engine_pb2.EngineInfo:
    return engine_pb2.EngineInfo(
        role=desc.role,
        engine_id=desc.engine_id,
        model_id=desc.model_id,
        layout_fingerprint=desc.fingerprint,
        block_size=desc.block_size,
        vocab_size=desc.vocab_size,
        max_model_len=desc.max_model_len,
        eos_token_ids=list(desc.eos_token_ids),
        hash_seed=desc.hash_seed,
    )


def info_from_proto(msg: engine_pb2.EngineInfo) -> EngineDescription:
    return EngineDescription(
        role=msg.role,
        engine_id=msg.engine_id,
        model_id=msg.model_id,
        fingerprint=msg.layout_fingerprint,
        block_size=msg.block_size,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        eos_token_ids=tuple(msg.eos_token_ids),
        hash_seed=msg.hash_seed,
    )


def load_to_proto(
    counters: EngineCounters, *, waiting: int, running: int, free_blocks: int, total_blocks: int
) -> engine_pb2.EngineLoad:
    return engine_pb2.EngineLoad(
        waiting=waiting,
        running=running,
        free_blocks=free_blocks,
        total_blocks=total_blocks,
        requests_total=counters.requests_total,
        computed_tokens_total=counters.computed_tokens_total,
        pool_tokens_total=counters.pool_tokens_total,
        busy_seconds_total=counters.busy_seconds_total,
    )
