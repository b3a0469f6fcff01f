"""Streaming detokenization that only emits text once it can no longer change."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

# Decoding a few tokens before the new ones keeps context-dependent decoders (byte-level,
# sentencepiece leading spaces) stable without re-decoding the whole sequence.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """New text made stable by token_id ('' while a multi-byte character is incomplete)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._read_offset = len(self._ids)
            self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
            return delta
        return ""
