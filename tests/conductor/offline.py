"""A real Conductor for tests of what it refuses: its engines and pool are never reached."""

from __future__ import annotations

from conductor.conductor import Conductor
from conductor.config import ConductorConfig
from conductor.engines import DecodeClient, PrefillClient
from conductor.fleet import Fleet
from conductor.scheduler import EngineState
from kvstore.client import KVStoreClient
from pantry.common.engine_info import EngineDescription

VOCAB = 100
CONTEXT = 64
MODEL = "tiny"


def offline_conductor() -> Conductor:
    """A real Conductor whose engines and pool are never reached: requests it refuses are
    refused before it calls them. Call inside a running event loop (grpc.aio channels)."""
    config = ConductorConfig(model="unused", kv_master="127.0.0.1:9", prefill=("127.0.0.1:9",),
                             decode=("127.0.0.1:9",))
    info = EngineDescription(role="prefill", engine_id="p0", model_id=MODEL, fingerprint="f",
                             block_size=4, vocab_size=VOCAB, max_model_len=CONTEXT,
                             eos_token_ids=(2,), hash_seed=0)
    fleet = Fleet([EngineState(PrefillClient("127.0.0.1:9", 1.0), info)],
                  [EngineState(DecodeClient("127.0.0.1:9", 1.0), info)],
                  KVStoreClient("127.0.0.1:9"))
    return Conductor(config, None, fleet)
