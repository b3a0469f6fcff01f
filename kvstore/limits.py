"""What one request to the pool may carry: key syntax, keys per request, bytes per request.

Checked at every edge (the master's and the node's servicers, the TCP server, and the client
before it sends), so a bad or oversized request is refused with a status that names the limit
and harms nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvstore.errors import InvalidKeyError, RequestTooLargeError

MAX_KEY_CHARS = 256
# Block keys are hex; names people give objects (`kvstore put NAME`) may use a few separators.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._:/=+@-]+")
KEY_SYNTAX = f"1 to {MAX_KEY_CHARS} characters of [A-Za-z0-9._:/=+@-]"


def check_key(key: str, field: str = "key") -> None:
    if not 0 < len(key) <= MAX_KEY_CHARS or not KEY_PATTERN.fullmatch(key):
        shown = key if len(key) <= 80 else key[:80] + "..."
        raise InvalidKeyError(field, f"{shown!r} is not a key ({KEY_SYNTAX})")


def check_keys(keys: Sequence[str], max_keys: int, field: str = "keys") -> None:
    if len(keys) > max_keys:
        raise RequestTooLargeError(
            f"{field}: {len(keys)} keys in one request; max_keys_per_request is {max_keys}")
    for i, key in enumerate(keys):
        check_key(key, f"{field}[{i}]")


def check_read_size(count: int, nbytes: int, max_ops: int, max_bytes: int) -> None:
    if count > max_ops:
        raise RequestTooLargeError(
            f"{count} reads in one request; max_ops_per_request is {max_ops}")
    if nbytes > max_bytes:
        raise RequestTooLargeError(
            f"read of {nbytes} bytes in one request; max_request_bytes is {max_bytes}")
