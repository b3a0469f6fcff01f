"""Named exceptions for the expected failures of the pool."""

from __future__ import annotations

from pantry.common.errors import InvalidRequest


class KVStoreError(Exception):
    """Base class of every expected kvstore failure."""


class ObjectTooLargeError(KVStoreError, ValueError):
    """An object exceeds `max_object_bytes` (or the largest slot a node can hold)."""


class UnknownNodeError(KVStoreError):
    """A request names a node the master does not know (never registered, or timed out)."""


class InvalidTokenError(KVStoreError, ValueError):
    """A token id is outside 0 <= t < 2**32 and cannot be hashed."""


class SegmentError(KVStoreError):
    """A read or write falls outside a node's shared-memory segment."""


class InvalidKeyError(KVStoreError, InvalidRequest):
    """A key is empty, too long or has characters outside the key syntax (INVALID_ARGUMENT)."""


class RequestTooLargeError(KVStoreError):
    """A request carries more keys, reads or bytes than the pool's limits (RESOURCE_EXHAUSTED);
    the message names the limit."""


class MetadataUnavailableError(KVStoreError):
    """The metadata store (a redis-server) cannot be reached or read."""


class NotLeaderError(KVStoreError):
    """A master's metadata commit was refused: the leader lease in Redis is no longer its own
    (it lapsed, or another master took it), so nothing of that commit was written and the
    master must stop serving (UNAVAILABLE)."""
