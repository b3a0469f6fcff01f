"""The error types every layer shares; each maps to one gRPC status and one HTTP code."""

from __future__ import annotations


class PantryError(Exception):
    """Base class of Pantry's expected failures."""


class ConfigError(PantryError, ValueError):
    """A role setting is invalid; the message starts with the setting's name."""


class InvalidRequest(PantryError, ValueError):
    """The caller must change `field`; INVALID_ARGUMENT over gRPC, 400 over HTTP."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Overloaded(PantryError, RuntimeError):
    """Admission refused the request for now; RESOURCE_EXHAUSTED over gRPC, 429 over HTTP."""


class Unavailable(PantryError, RuntimeError):
    """An engine or the pool is down or stopping; UNAVAILABLE over gRPC, 503 over HTTP."""
