"""Named exceptions for the expected failures of the pool."""

from __future__ import annotations


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
