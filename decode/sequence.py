"""One request's state inside the decode engine."""

from __future__ import annotations

import enum
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.block_keys import KeyChain
from pantry.common.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued: no KV blocks yet
    LOADING = "loading"      # blocks held; prompt KV being pulled from the pool in the background
    FILLING = "filling"      # the rest of the prompt KV being computed, chunk by chunk (after a
    #                          preemption: the prompt and the output so far)
    RUNNING = "running"      # generating one token per step
    FINISHED = "finished"


@dataclass(frozen=True)
class DecodeEvent:
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    pool_tokens: int = 0
    computed_tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class DecodeJob:
    request_id: str
    token_ids: tuple[int, ...]
    tenant: str
    sampling: SamplingParams
    first_token: int | None = None


@dataclass(eq=False)
class Sequence:
    job: DecodeJob
    generator: torch.Generator | None
    chain: KeyChain             # the keys of its full blocks, extended as output fills blocks
    # A prefill handoff's partial last prompt block, stored by the prefill engine under this key
    # (None: no first token given, or the prompt fills whole blocks).
    tail_key: str | None = None
    status: SeqStatus = SeqStatus.WAITING
    fill: tuple[int, ...] = ()  # what FILLING computes: fill_tokens() at admission
    preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    num_computed: int = 0       # tokens whose KV is in the paged cache
    local_blocks: int = 0       # leading blocks found in this engine's prefix cache
    cached_blocks: int = 0      # leading full blocks indexed in this engine's prefix cache
    stored_blocks: int = 0      # leading full blocks known to be in the pool (or being written)
    pool_tokens: int = 0
    # The background pull of the prompt's cached blocks: (leading full blocks loaded, whether a
    # handoff's whole prompt did, its tail block included).
    pull: Future[tuple[int, bool]] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0  # perf_counter() at the last token emitted
    events: queue.Queue[DecodeEvent] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.job.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.job.token_ids) + len(self.output)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + output, without copying the rest."""
        prompt = self.job.token_ids
        p = len(prompt)
        if end <= p:
            return prompt[start:end]
        if start >= p:
            return tuple(self.output[start - p : end - p])
        return (*prompt[start:], *self.output[: end - p])

    def fill_tokens(self) -> tuple[int, ...]:
        """The tokens whose KV must be in the cache before the sequence generates: its prompt;
        for a sequence preempted after it generated, its prompt and output but the last token,
        which the next step computes."""
        if not self.output:
            return self.job.token_ids
        return self.token_slice(0, self.num_tokens - 1)
