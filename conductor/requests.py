"""What the conductor serves, independent of the API it arrived through."""

from __future__ import annotations

from dataclasses import dataclass, field

from pantry.common.errors import InvalidRequest
from pantry.common.sampling import SamplingParams

# Each stop string is matched against the streamed text of every chunk: a bound keeps that cheap.
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None           # None = server default
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                "stop", f"must have at most {MAX_STOP_STRINGS} items, got {len(self.stop)}")

    def resolve(self, max_tokens: int) -> SamplingParams:
        """What the engines get, with the limit decided; raises InvalidRequest naming a field."""
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids,
        )


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str = ""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tenant: str = ""
    prompt_field: str = "prompt"            # how the API names the prompt, for error messages
    max_tokens_field: str = "max_tokens"    # and the limit (chat may say max_completion_tokens)
    default_max_tokens: int | None = None   # the API's own default; None = the server's


@dataclass(frozen=True)
class PromptAccepted:
    prompt_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokensGenerated:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    prefill_skipped: bool


@dataclass(frozen=True)
class GenerationFinished:
    finish_reason: str
    text: str                               # held-back text released at the end
    usage: Usage


GenerationEvent = PromptAccepted | TokensGenerated | GenerationFinished
