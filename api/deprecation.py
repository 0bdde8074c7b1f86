"""Deprecated operations (SPEC.md, Versioning): declared on the route, announced on every
response and in the OpenAPI document.

    LEGACY = Deprecation(since=..., sunset=..., successor="/api/v1/vehicles/{vehicle_id}/timeline")

    @router.get("/{vehicle_id}/events", **LEGACY.route_kwargs())

marks the operation `deprecated: true` in the OpenAPI document with an `x-deprecation` object
(since, sunset, successor) and the headers below on each response; `DeprecationMiddleware`
adds to each response of that route:

- `Deprecation: @<unix seconds>` (RFC 9745): since when it is deprecated;
- `Sunset: <HTTP-date>` (RFC 8594): after this it may answer 404 (or 410);
- `Link: <successor>; rel="successor-version"` when it has one (path parameters filled in).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

from starlette.types import Message, Receive, Scope, Send

from api.middleware import HttpMiddleware

EXTENSION = "x-deprecation"


@dataclass(frozen=True)
class Deprecation:
    since: datetime
    sunset: datetime
    successor: str | None = None  # a path template of the replacement, e.g. "/api/v1/x/{id}"

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.sunset.tzinfo is None:
            raise ValueError("deprecation dates must be timezone-aware")
        if self.sunset <= self.since:
            raise ValueError("the sunset must come after the deprecation")

    def route_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the route decorator."""
        extension: dict[str, Any] = {
            "since": self.since.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "sunset": self.sunset.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.successor:
            extension["successor"] = self.successor
        return {"deprecated": True, "openapi_extra": {EXTENSION: extension}}


def deprecation_headers(
    extension: dict[str, Any], path_params: dict[str, Any]
) -> list[tuple[bytes, bytes]]:
    since = datetime.fromisoformat(extension["since"])
    sunset = datetime.fromisoformat(extension["sunset"])
    headers = [
        (b"deprecation", f"@{int(since.timestamp())}".encode()),
        (b"sunset", format_datetime(sunset.astimezone(UTC), usegmt=True).encode()),
    ]
    successor = extension.get("successor")
    if successor:
        # Each value percent-encoded: a path parameter is the client's text, and a control
        # character in a header value fails the response (a 500 instead of the answer).
        quoted = {name: quote(str(value), safe="") for name, value in path_params.items()}
        try:
            target = successor.format(**quoted)
        except (KeyError, IndexError, ValueError):
            target = successor
        headers.append(
            (b"link", f'<{target}>; rel="successor-version"'.encode("latin-1", "replace"))
        )
    return headers


class DeprecationMiddleware(HttpMiddleware):
    """Adds the deprecation headers to every response of a route declared deprecated."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")  # set by the router once a route matched
                extra = getattr(route, "openapi_extra", None) or {}
                extension = extra.get(EXTENSION)
                if getattr(route, "deprecated", False) and extension:
                    message["headers"] = list(message.get("headers") or []) + deprecation_headers(
                        extension, scope.get("path_params") or {}
                    )
            await send(message)

        await self.app(scope, receive, send_wrapper)


def document_deprecations(schema: dict[str, Any]) -> None:
    """Document the deprecation headers on every response of a deprecated operation."""
    headers = {
        "Deprecation": {
            "description": "RFC 9745: `@<unix seconds>`, since when this operation is deprecated",
            "schema": {"type": "string", "pattern": "^@[0-9]+$"},
        },
        "Sunset": {
            "description": "RFC 8594: the HTTP-date after which this operation may be removed",
            "schema": {"type": "string"},
        },
        "Link": {
            "description": 'The replacement: `<path>; rel="successor-version"`',
            "schema": {"type": "string"},
        },
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or not operation.get("deprecated"):
                continue
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {}).update(copy.deepcopy(headers))
