"""Motorcade's one exception tree: every error a client can receive is a class here, carrying
its error `code` (SPEC.md, "HTTP conventions") and HTTP `status`.

Services, core and the API raise these classes; one handler (`api/errors.py`) renders any of
them as the error envelope, and the rollout activities turn them into non-retryable Temporal
`ApplicationError`s of the same name (unless `retryable`). A more specific error is a
subclass of the class of its code (`RolloutNotFound` is a `NotFound`), never a second tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class MotorcadeError(Exception):
    """The root: `code` and `status` say what the client receives, `message` and `details`
    what went wrong (SPEC's envelope). `expose` False: the message is for the server's log
    only, the client reads the class's generic one. `retryable` True: an activity that meets
    it fails its attempt and Temporal retries (a transient condition, not a refusal)."""

    code = "INTERNAL"
    status = 500
    message = "internal error"
    expose = True
    retryable = False

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = list(details)
        self.headers = dict(headers or {})

    @property
    def public_message(self) -> str:
        """What the client is told."""
        return self.message if self.expose else type(self).message


# A 4xx the framework raised that no class names (api/errors.py maps the ones it knows to
# their classes); none is known to be reachable, the mapping is a safety net.
HTTP_ERROR = "HTTP_ERROR"


def error_classes() -> list[type[MotorcadeError]]:
    """MotorcadeError and every class below it: the tree that holds the codes."""
    found: list[type[MotorcadeError]] = []
    pending: list[type[MotorcadeError]] = [MotorcadeError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def error_codes() -> list[str]:
    """Every `code` an error answer can carry: the codes of this tree and HTTP_ERROR, sorted
    (the enum of `ErrorBody.code` in the API's description)."""
    return sorted({HTTP_ERROR, *(cls.code for cls in error_classes())})


class _RetryAfter(MotorcadeError):
    """An error whose answer carries `Retry-After` (seconds)."""

    default_retry_after = 1

    def __init__(self, message: str | None = None, *, retry_after: int | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after
        self.headers.setdefault("Retry-After", str(self.retry_after))


class InvalidInput(MotorcadeError):
    """Input that is malformed or not acceptable (a bad cursor, an unknown release)."""

    code, status, message = "VALIDATION_ERROR", 422, "the request is not valid"


class Unauthenticated(MotorcadeError):
    code, status, message = "UNAUTHENTICATED", 401, "a valid bearer token is required"

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="motorcade"')


class Forbidden(MotorcadeError):
    """The caller's role may not do this, or the write reaches outside its scope."""

    code, status, message = "FORBIDDEN", 403, "your role may not do this"


class NotFound(MotorcadeError):
    """Absent, or outside the caller's scope (never say which)."""

    code, status, message = "NOT_FOUND", 404, "not found"


class RolloutNotFound(NotFound):
    """The rollout row does not exist (its workflow outlived it: an activity cannot go on)."""


class MethodNotAllowed(MotorcadeError):
    code, status, message = "METHOD_NOT_ALLOWED", 405, "method not allowed"


class Conflict(MotorcadeError):
    """What the request would do clashes with what is there (a release registered already,
    vehicles inside another active rollout)."""

    code, status, message = "CONFLICT", 409, "conflict"


class TargetsChanged(Conflict):
    """The matching fleet changed between counting and inserting a rollout's targets: the
    activity's attempt rolls back and Temporal runs it again."""

    retryable = True


class InvalidStateTransition(MotorcadeError):
    """A control action that the rollout's current status does not allow."""

    code, status, message = "INVALID_STATE_TRANSITION", 409, "not allowed in the current state"


class IdempotencyKeyInUse(_RetryAfter):
    code, status = "IDEMPOTENCY_KEY_IN_USE", 409
    message = "a request with this Idempotency-Key is still in progress"


class IdempotencyKeyMismatch(MotorcadeError):
    code, status = "IDEMPOTENCY_KEY_MISMATCH", 422
    message = "this Idempotency-Key was used with a different request"


class SafetyPolicyWeakened(MotorcadeError):
    """A safety policy weaker than the fleet default, not acknowledged with a reason."""

    code, status = "SAFETY_POLICY_WEAKENED", 422
    message = "the safety policy is weaker than the fleet default"


class ReleaseSignatureInvalid(MotorcadeError):
    """A release whose signature does not verify against the trusted keys (or none are set)."""

    code, status, message = "RELEASE_SIGNATURE_INVALID", 422, "the release signature is invalid"


class PayloadTooLarge(MotorcadeError):
    code, status, message = "PAYLOAD_TOO_LARGE", 413, "the request body is too large"


class RateLimited(_RetryAfter):
    code, status, message = "RATE_LIMITED", 429, "too many requests"


class Overloaded(_RetryAfter):
    """A queue is full (telemetry ingest): retry after `retry_after` seconds."""

    code, status, message = "OVERLOADED", 503, "the service is overloaded; retry later"


class DependencyUnavailable(_RetryAfter):
    """PostgreSQL or Temporal did not answer (or the connection broke): retry."""

    code, status, message = "UNAVAILABLE", 503, "a dependency is unavailable; retry later"
    default_retry_after = 5


class Misconfigured(MotorcadeError):
    """The server's own configuration is broken (a trusted-keys file that cannot be read):
    the message names it in the log; the client gets a plain 500."""

    expose = False
