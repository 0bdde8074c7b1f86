"""One exception tree, each class with its error code and HTTP status, rendered by one handler
into the error envelope of SPEC.md. No stack trace, SQL or secret ever reaches a client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.envelope import error_body
from models.api import ErrorEnvelope
from services import errors as domain
from services import rollouts as rollout_errors

log = structlog.stdlib.get_logger("motorcade.api")


class AppError(Exception):
    code = "INTERNAL"
    status = 500
    message = "internal error"

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
        self.headers = headers or {}


class ValidationFailed(AppError):
    code, status, message = "VALIDATION_ERROR", 422, "the request is not valid"


class Unauthenticated(AppError):
    code, status, message = "UNAUTHENTICATED", 401, "a valid bearer token is required"

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="motorcade"'})
        super().__init__(message, **kw)


class Forbidden(AppError):
    code, status, message = "FORBIDDEN", 403, "your role may not do this"


class NotFound(AppError):
    code, status, message = "NOT_FOUND", 404, "not found"


class MethodNotAllowed(AppError):
    code, status, message = "METHOD_NOT_ALLOWED", 405, "method not allowed"


class Conflict(AppError):
    code, status, message = "CONFLICT", 409, "conflict"


class InvalidStateTransition(AppError):
    code, status, message = "INVALID_STATE_TRANSITION", 409, "not allowed in the current state"


class IdempotencyKeyInUse(AppError):
    code, status = "IDEMPOTENCY_KEY_IN_USE", 409
    message = "a request with this Idempotency-Key is still in progress"


class IdempotencyKeyMismatch(AppError):
    code, status = "IDEMPOTENCY_KEY_MISMATCH", 422
    message = "this Idempotency-Key was used with a different request"


class SafetyPolicyWeakened(AppError):
    code, status = "SAFETY_POLICY_WEAKENED", 422
    message = "the safety policy is weaker than the fleet default"


class ReleaseSignatureInvalid(AppError):
    code, status, message = "RELEASE_SIGNATURE_INVALID", 422, "the release signature is invalid"


class PayloadTooLarge(AppError):
    code, status, message = "PAYLOAD_TOO_LARGE", 413, "the request body is too large"


class RateLimited(AppError):
    code, status, message = "RATE_LIMITED", 429, "too many requests"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kw)


class Overloaded(AppError):
    code, status, message = "OVERLOADED", 503, "the service is overloaded; retry later"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kw)


class DependencyUnavailable(AppError):
    code, status, message = "UNAVAILABLE", 503, "a dependency is unavailable; retry later"

    def __init__(self, message: str | None = None, *, retry_after: int = 5, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kw)


def _field_path(loc: Sequence[Any]) -> tuple[str | None, int | None]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    index = next((int(p) for p in loc if isinstance(p, int)), None)
    return (".".join(parts) or None), index


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    details = []
    for err in errors:
        field, index = _field_path(err.get("loc", ()))
        message = str(err.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        details.append(
            {"field": field, "index": index, "message": message, "code": err.get("type")}
        )
    return details


def _render(request: Request, exc: AppError) -> JSONResponse:
    return JSONResponse(
        error_body(request, exc.code, exc.message, exc.details),
        status_code=exc.status,
        headers=exc.headers,
    )


async def app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if exc.status >= 500:
        log.warning("request failed", code=exc.code, message=exc.message)
    return _render(request, exc)


async def validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _render(
            request,
            ValidationFailed(
                "the request body is not valid JSON",
                details=[{"field": "body", "message": "malformed JSON", "code": "json_invalid"}],
            ),
        )
    details = validation_details(errors)
    first = details[0]["field"] if details else None
    message = f"invalid value for {first}" if first else "the request is not valid"
    return _render(request, ValidationFailed(message, details=details))


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    mapped: AppError
    if exc.status_code == 404:
        mapped = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif exc.status_code == 401:
        mapped = Unauthenticated()
    elif exc.status_code == 403:
        mapped = Forbidden()
    elif exc.status_code == 400:
        mapped = ValidationFailed(str(exc.detail))
    else:
        mapped = AppError(str(exc.detail))
        mapped.status = exc.status_code
        mapped.code = "HTTP_ERROR" if exc.status_code < 500 else "INTERNAL"
    if exc.headers:
        mapped.headers.update(exc.headers)
    return _render(request, mapped)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", path=request.url.path)
    return _render(request, AppError())


DOMAIN_ERRORS: dict[type[domain.DomainError], type[AppError]] = {
    domain.InvalidInput: ValidationFailed,
    domain.NotFoundError: NotFound,
    domain.OutOfScope: Forbidden,
    domain.SafetyWeakened: SafetyPolicyWeakened,
    domain.AlreadyExists: Conflict,
    rollout_errors.ReleaseSignatureRejected: ReleaseSignatureInvalid,
    rollout_errors.OverlapConflict: Conflict,
    rollout_errors.InvalidTransition: InvalidStateTransition,
}


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, domain.DomainError)
    mapped = next(
        (app_cls for dom_cls, app_cls in DOMAIN_ERRORS.items() if isinstance(exc, dom_cls)),
        ValidationFailed,
    )
    return _render(request, mapped(exc.message, details=exc.details))


# SQLSTATEs of a lost connection: class 08 (connection exception) and the server shutting
# down (57P01-57P03); a client-side failure has none.
LOST_CONNECTION_STATES = ("57P01", "57P02", "57P03")
TRANSIENT_REFUSALS = ("the database system is", "too many clients", "remaining connection slots")


def _connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return bool(exc.connection_invalidated) or (
            exc.orig is not None and _connection_lost(exc.orig)
        )
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        if state is None:  # raised by the client: a broken connection, or one not made
            text = str(exc)
            # The server refused it: a missing database or role is configuration (a 500),
            # a server starting, stopping or full is transient.
            return "FATAL:" not in text or any(t in text for t in TRANSIENT_REFUSALS)
        return state.startswith("08") or state in LOST_CONNECTION_STATES
    return False


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The connection to PostgreSQL broke under a request (the server restarted or failed
    over): 503 with Retry-After, never a 500; the broken connection is not pooled again
    (core/db.py). Any other database error goes on to the last-resort 500."""
    if not _connection_lost(exc):
        raise exc
    log.warning("database connection lost", path=request.url.path, error=type(exc).__name__)
    return _render(
        request, DependencyUnavailable("the database connection was lost; retry", retry_after=1)
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(domain.DomainError, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(psycopg.OperationalError, database_error_handler)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, database_error_handler)
    app.add_exception_handler(Exception, unhandled_handler)


def _responses(*errors: type[AppError]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        entry = out.setdefault(err.status, {"model": ErrorEnvelope, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], err.code]))
    return out


class ErrorResponses:
    """OpenAPI `responses` for the error envelope, per kind of operation."""

    read = _responses(Unauthenticated, Forbidden, ValidationFailed)
    read_one = _responses(Unauthenticated, Forbidden, NotFound, ValidationFailed)
    write = _responses(
        Unauthenticated,
        Forbidden,
        NotFound,
        ValidationFailed,
        Conflict,
        SafetyPolicyWeakened,
        DependencyUnavailable,
    )
    create = _responses(
        Unauthenticated,
        Forbidden,
        ValidationFailed,
        Conflict,
        SafetyPolicyWeakened,
        ReleaseSignatureInvalid,
        DependencyUnavailable,
    )
    control = _responses(
        Unauthenticated,
        Forbidden,
        NotFound,
        ValidationFailed,
        InvalidStateTransition,
        DependencyUnavailable,
    )
