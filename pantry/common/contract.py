"""The one check of a prompt against the model it is sent to.

The conductor runs it at its edge with the API's own field names, so a caller learns what to
change; the engines run the same check on what they receive, so nothing reaches a model that
could index out of its vocabulary or context.
"""

from __future__ import annotations

from collections.abc import Sequence

from pantry.common.errors import InvalidRequest


def check_prompt(
    tokens: Sequence[int],
    max_tokens: int,
    *,
    vocab_size: int,
    max_model_len: int,
    field: str = "prompt",
    max_tokens_field: str = "max_tokens",
) -> None:
    if not tokens:
        raise InvalidRequest(field, "is empty; send at least one token")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    n = len(tokens)
    if n >= max_model_len:
        raise InvalidRequest(
            field,
            f"{n} tokens do not fit the model's context of {max_model_len} tokens; "
            "shorten the prompt",
        )
    if max_tokens < 1:
        raise InvalidRequest(max_tokens_field, f"must be at least 1, got {max_tokens}")
    room = max_model_len - n
    if max_tokens > room:
        raise InvalidRequest(
            max_tokens_field,
            f"{max_tokens} is too large: the {n}-token prompt leaves room for "
            f"{room} tokens in the context of {max_model_len}",
        )
