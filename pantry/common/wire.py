"""Protobuf <-> domain conversions for the messages the conductor and the engines share.

One converter per message, at the edge: servicers and clients call these once per message and
work with the frozen dataclasses beyond.
"""

from __future__ import annotations

from pantry.common.engine_info import EngineDescription, EngineLoad
from pantry.common.sampling import SamplingParams
from pantry.v1 import common_pb2, engine_pb2


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        max_tokens=p.max_tokens,
        ignore_eos=p.ignore_eos,
        stop_token_ids=list(p.stop_token_ids),
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,  # proto3's unset 0 means "off"
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        ignore_eos=msg.ignore_eos,
        stop_token_ids=tuple(msg.stop_token_ids),
    )


def info_to_proto(d: EngineDescription) -> engine_pb2.EngineInfo:
    return engine_pb2.EngineInfo(
        role=d.role,
        engine_id=d.engine_id,
        model_id=d.model_id,
        layout_fingerprint=d.fingerprint,
        block_size=d.block_size,
        vocab_size=d.vocab_size,
        max_model_len=d.max_model_len,
        eos_token_ids=list(d.eos_token_ids),
        hash_seed=d.hash_seed,
        salt=d.salt,
        host_id=d.host_id,
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
        salt=msg.salt,
        host_id=msg.host_id,
    )


def load_to_proto(load: EngineLoad) -> engine_pb2.EngineLoad:
    return engine_pb2.EngineLoad(
        waiting=load.waiting,
        running=load.running,
        free_blocks=load.free_blocks,
        total_blocks=load.total_blocks,
        requests_total=load.requests_total,
        computed_tokens_total=load.computed_tokens_total,
        pool_tokens_total=load.pool_tokens_total,
        busy_seconds_total=load.busy_seconds_total,
    )


def load_from_proto(msg: engine_pb2.EngineLoad) -> EngineLoad:
    return EngineLoad(
        waiting=msg.waiting,
        running=msg.running,
        free_blocks=msg.free_blocks,
        total_blocks=msg.total_blocks,
        requests_total=msg.requests_total,
        computed_tokens_total=msg.computed_tokens_total,
        pool_tokens_total=msg.pool_tokens_total,
        busy_seconds_total=msg.busy_seconds_total,
    )
