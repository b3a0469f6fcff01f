"""A conductor with fake engines and a real pool: scripted engine answers, recorded calls.

The engines are the only fakes: the pool is a real kvstore master and node (the `pool_address`
fixture), so prefix matching is the real thing. Each `Rig.generate` runs on a fresh event loop;
nothing in the conductor or the fakes is bound to one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass, field
from itertools import count
from types import TracebackType
from typing import Any, TypeVar

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from conductor.conductor import Conductor
from conductor.config import ConductorConfig
from conductor.engines import DecodeChunk, PrefillResult
from conductor.fleet import Fleet
from conductor.requests import GenerationEvent, GenerationRequest, Sampling, Usage
from conductor.scheduler import EngineState
from engine.tokenizer import Tokenizer
from kvstore.client import KVStoreClient
from pantry.common.engine_info import EngineDescription, EngineLoad
from pantry.common.sampling import SamplingParams

BLOCK = 16
VOCAB = 64
MAX_MODEL_LEN = 128
MODEL_ID = "fake-model"
_CHARS = "abcdefghijklmnopqrstuvwxyz #.!"

T = TypeVar("T")


def description(role: str, engine_id: str) -> EngineDescription:
    return EngineDescription(role=role, engine_id=engine_id, model_id=MODEL_ID,
                             fingerprint="fake-layout", block_size=BLOCK, vocab_size=VOCAB,
                             max_model_len=MAX_MODEL_LEN, eos_token_ids=(2,), hash_seed=0)


def engine_load(free_blocks: int = 100, waiting: int = 0, **totals: Any) -> EngineLoad:
    values: dict[str, Any] = dict(running=0, total_blocks=100, requests_total=0,
                                  computed_tokens_total=0, pool_tokens_total=0,
                                  busy_seconds_total=0.0)
    values.update(totals)
    return EngineLoad(waiting=waiting, free_blocks=free_blocks, **values)


def chunk(*ids: int, finish: str = "", pool_tokens: int = 0, computed: int = 0) -> DecodeChunk:
    return DecodeChunk(tuple(ids), finish, pool_tokens, computed)


def char_tokenizer() -> Tokenizer:
    """One token per character ('a' = 3, 'b' = 4, ..., ' ' = 29, '#' = 30), eos '</s>' = 2."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(_CHARS)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(backend, bos_token=None, eos_tokens=("</s>",), chat_template=None,
                     special_tokens={})


def token_ids(text: str) -> tuple[int, ...]:
    return tuple(_CHARS.index(c) + 3 for c in text)


_request_ids = count()


def request(tokens: Sequence[int] | None = None, *, text: str | None = None,
            tenant: str = "", **sampling: Any) -> GenerationRequest:
    """Greedy, 4 tokens unless told otherwise."""
    settings: dict[str, Any] = {"temperature": 0.0, "max_tokens": 4, **sampling}
    return GenerationRequest(
        request_id=f"req-{next(_request_ids)}",
        token_ids=None if tokens is None else tuple(tokens),
        text=text,
        sampling=Sampling(**settings),
        tenant=tenant,
    )


def prompt(length: int, start: int = 3) -> tuple[int, ...]:
    """Distinct token ids inside the vocabulary (0-2 are the special tokens)."""
    return tuple(3 + (start - 3 + i) % (VOCAB - 3) for i in range(length))


def timeless(usage: Usage) -> Usage:
    """The usage with ttft_s zeroed: the only field a test cannot know exactly."""
    return dataclasses.replace(usage, ttft_s=0.0)


@dataclass(frozen=True)
class PrefillCall:
    request_id: str
    token_ids: tuple[int, ...]
    tenant: str
    sampling: SamplingParams


@dataclass(frozen=True)
class DecodeCall:
    request_id: str
    token_ids: tuple[int, ...]
    tenant: str
    sampling: SamplingParams
    first_token: int | None


@dataclass
class FakeEngine:
    """Info and Load, as both engine roles answer them."""

    description: EngineDescription
    load_value: EngineLoad = field(default_factory=engine_load)
    load_error: Exception | None = None
    closed: bool = False

    @property
    def address(self) -> str:
        return f"fake-{self.description.engine_id}:0"

    async def info(self, timeout: float = 5.0) -> EngineDescription:
        return self.description

    async def load(self, timeout: float = 2.0) -> EngineLoad:
        if self.load_error is not None:
            raise self.load_error
        return self.load_value

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakePrefill(FakeEngine):
    first_token: int = 7
    pool_tokens: int = 0            # what the engine says it pulled from the pool
    error: Exception | None = None
    calls: list[PrefillCall] = field(default_factory=list)

    async def prefill(self, request_id: str, tokens: tuple[int, ...], tenant: str,
                      sampling: SamplingParams) -> PrefillResult:
        self.calls.append(PrefillCall(request_id, tokens, tenant, sampling))
        if self.error is not None:
            raise self.error
        return PrefillResult(self.first_token, self.pool_tokens, len(tokens) - self.pool_tokens)


@dataclass
class FakeDecode(FakeEngine):
    """Streams `chunks` (the first repeats a prefilled first token, as the engine does), then
    raises `error` if one is set."""

    chunks: Sequence[DecodeChunk] = ()
    error: Exception | None = None
    calls: list[DecodeCall] = field(default_factory=list)
    open_streams: int = 0
    closed_streams: int = 0

    async def decode(self, request_id: str, tokens: tuple[int, ...], tenant: str,
                     sampling: SamplingParams, first_token: int | None,
                     ) -> AsyncGenerator[DecodeChunk, None]:
        self.calls.append(DecodeCall(request_id, tokens, tenant, sampling, first_token))
        self.open_streams += 1
        try:
            for c in self.chunks:
                yield c
            if self.error is not None:
                raise self.error
        finally:
            self.open_streams -= 1
            self.closed_streams += 1


def fake_prefill(engine_id: str, **kw: Any) -> FakePrefill:
    return FakePrefill(description("prefill", engine_id), **kw)


def fake_decode(engine_id: str, *chunks: DecodeChunk, **kw: Any) -> FakeDecode:
    return FakeDecode(description("decode", engine_id), chunks=chunks, **kw)


class Rig:
    """A Conductor over fake engines and the real pool at `pool_address`; a context manager
    that closes the pool client."""

    def __init__(self, pool_address: str, prefills: Sequence[FakePrefill],
                 decodes: Sequence[FakeDecode], tokenizer: Tokenizer | None = None,
                 **config: Any) -> None:
        self.prefills = list(prefills)
        self.decodes = list(decodes)
        self.pool = KVStoreClient(pool_address, host_id="host-a")
        settings: dict[str, Any] = dict(
            model="fake", kv_master=pool_address,
            prefill=tuple(p.address for p in prefills), decode=tuple(d.address for d in decodes),
        )
        settings.update(config)
        fleet = Fleet([EngineState(p, p.description) for p in self.prefills],  # type: ignore[arg-type]
                      [EngineState(d, d.description) for d in self.decodes],  # type: ignore[arg-type]
                      self.pool)
        self.conductor = Conductor(ConductorConfig(**settings), tokenizer, fleet)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.pool.close()

    @property
    def prefill_states(self) -> list[EngineState[Any]]:
        return self.conductor.fleet.prefills  # type: ignore[return-value]

    @property
    def decode_states(self) -> list[EngineState[Any]]:
        return self.conductor.fleet.decodes  # type: ignore[return-value]

    def cache(self, tokens: Sequence[int], blocks: int | None = None, tenant: str = "") -> None:
        """Puts the first `blocks` full blocks of `tokens` (all by default) into the pool."""
        keys = self.conductor.addressing.block_keys(tuple(tokens), tenant)
        keys = keys if blocks is None else keys[:blocks]
        assert self.pool.put_many([(k, b"kv") for k in keys]) == [True] * len(keys)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(work)

    def generate(self, req: GenerationRequest) -> list[GenerationEvent]:
        async def collect() -> list[GenerationEvent]:
            return [event async for event in self.conductor.generate(req)]
        return asyncio.run(collect())

    def sample(self, name: str, **labels: str) -> float | None:
        return self.conductor.metrics.registry.get_sample_value(name, labels)
