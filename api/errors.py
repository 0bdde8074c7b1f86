"""The error handlers: one renders any error of the tree (`core/errors.py`) as the error
envelope of SPEC.md; the others turn what FastAPI, Starlette and the database driver raise
into errors of the tree. No stack trace, SQL or secret ever reaches a client."""

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
from starlette.routing import Match

from api.envelope import error_body
from core.db import database_unavailable
from core.errors import (
    HTTP_ERROR,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    InvalidInput,
    InvalidStateTransition,
    MethodNotAllowed,
    MotorcadeError,
    NotFound,
    PayloadTooLarge,
    ReleaseSignatureInvalid,
    SafetyPolicyWeakened,
    Unauthenticated,
)
from models.api import ErrorEnvelope
from models.storable import UNSTORABLE

log = structlog.stdlib.get_logger("motorcade.api")


def _field_path(loc: Sequence[Any]) -> tuple[str | None, int | None]:
    # A name is the client's text (an unknown body field): one PostgreSQL cannot store (U+0000,
    # a lone surrogate) is shown with U+FFFD in its place, so the answer itself can be stored
    # (an Idempotency-Key records it) and logged.
    parts = [
        UNSTORABLE.sub("\ufffd", str(p))
        for p in loc
        if p not in ("body", "query", "path", "header")
    ]
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


def _render(request: Request, exc: MotorcadeError) -> JSONResponse:
    return JSONResponse(
        error_body(request, exc.code, exc.public_message, exc.details),
        status_code=exc.status,
        headers=exc.headers,
    )


async def app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MotorcadeError)
    if exc.status >= 500:  # a message kept from the client is logged with its traceback
        log.warning("request failed", code=exc.code, message=exc.message, exc_info=not exc.expose)
    return _render(request, exc)


def invalid_request(errors: Sequence[Any], *, note: str = "") -> InvalidInput:
    """The 422 of a request that failed validation (pydantic's `errors`): a body that is not
    JSON, else each invalid field, the first named in the message (then `note`)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidInput(
            "the request body is not valid JSON",
            details=[{"field": "body", "message": "malformed JSON", "code": "json_invalid"}],
        )
    details = validation_details(errors)
    first = details[0]["field"] if details else None
    message = f"invalid value for {first}" if first else "the request is not valid"
    return InvalidInput(message + note, details=details)


async def validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _render(request, invalid_request(exc.errors()))


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    mapped: MotorcadeError
    if exc.status_code == 404:
        mapped = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif exc.status_code == 401:
        mapped = Unauthenticated()
    elif exc.status_code == 403:
        mapped = Forbidden()
    elif exc.status_code == 400:
        # FastAPI's own 400 is a body its JSON parser gave up on (an integer past its digit
        # limit, nesting past its depth): named like any malformed body.
        mapped = InvalidInput(
            str(exc.detail),
            details=[{"field": "body", "message": str(exc.detail), "code": "json_invalid"}],
        )
    elif exc.status_code == 413:  # api/bodylimit.py cut a body a route was reading
        mapped = PayloadTooLarge(str(exc.detail))
    else:
        mapped = MotorcadeError(str(exc.detail))
        mapped.status = exc.status_code
        mapped.code = HTTP_ERROR if exc.status_code < 500 else "INTERNAL"
    if exc.headers:
        mapped.headers.update(exc.headers)
    if exc.status_code == 405:
        mapped.headers["Allow"] = allowed_methods(request)
    return _render(request, mapped)


def allowed_methods(request: Request) -> str:
    """Every method the path answers (RFC 9110 `Allow`): Starlette's 405 names only the
    methods of the first route matching the path, and GET and POST of one path are two
    routes here. Asked of the routes themselves, for each method."""
    allowed = [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", path=request.url.path)
    return _render(request, MotorcadeError())


def unavailable(why: str) -> DependencyUnavailable:
    """The 503 of a database that cannot serve now (`core.db.database_unavailable`)."""
    messages = {
        "pool": "the server has no free database connection; retry",
        "timeout": "the database did not answer in time; retry",
        "lost": "the database connection was lost; retry",
    }
    return DependencyUnavailable(messages.get(why), retry_after=1 if why == "lost" else 2)


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The database cannot serve this request now: the connection broke (the server
    restarted or failed over; it is not pooled again, core/db.py), a statement or lock
    timeout ended it (SQLSTATE 57014, 55P03, 25P03), or no pooled connection was free in
    time (the pool's TimeoutError): 503 `UNAVAILABLE` with Retry-After, never a 500. Any
    other database error goes on to the last-resort 500."""
    why = database_unavailable(exc)
    if why is None:
        raise exc
    log.warning("database unavailable", path=request.url.path, why=why, error=type(exc).__name__)
    return _render(request, unavailable(why))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MotorcadeError, app_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(psycopg.OperationalError, database_error_handler)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, database_error_handler)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, database_error_handler)
    app.add_exception_handler(Exception, unhandled_handler)


def error_responses(*errors: type[MotorcadeError]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        entry = out.setdefault(err.status, {"model": ErrorEnvelope, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], err.code]))
    return out


class ErrorResponses:
    """OpenAPI `responses` for the error envelope, per kind of operation."""

    read = error_responses(Unauthenticated, Forbidden, InvalidInput)
    read_one = error_responses(Unauthenticated, Forbidden, NotFound, InvalidInput)
    write = error_responses(
        Unauthenticated,
        Forbidden,
        NotFound,
        InvalidInput,
        Conflict,
        SafetyPolicyWeakened,
        DependencyUnavailable,
    )
    create = error_responses(
        Unauthenticated,
        Forbidden,
        InvalidInput,
        Conflict,
        SafetyPolicyWeakened,
        ReleaseSignatureInvalid,
        DependencyUnavailable,
    )
    control = error_responses(
        Unauthenticated,
        Forbidden,
        NotFound,
        InvalidInput,
        InvalidStateTransition,
        DependencyUnavailable,
    )
