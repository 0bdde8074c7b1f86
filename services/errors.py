"""Domain errors raised by services; the API maps each to its error code (api/errors.py)."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidInput(DomainError):
    """Input that is well-formed but not acceptable (a bad cursor, an unknown release)."""


class NotFoundError(DomainError):
    """Absent, or outside the caller's scope (never say which)."""


class OutOfScope(DomainError):
    """A write that reaches outside the caller's scope."""


class SafetyWeakened(DomainError):
    """A safety policy weaker than the fleet default, not acknowledged with a reason."""


class AlreadyExists(DomainError):
    """What the request would create exists already (409 CONFLICT)."""
