"""The success and error envelopes of SPEC.md."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel
from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import Response


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def encode(data: Any) -> Any:
    """`data` as JSON-ready values (aliases as field names). A model, or a list of models (every
    page), is dumped by pydantic itself: `jsonable_encoder` gives the same result but then walks
    it again value by value in Python, which was 40% of the API's CPU on a list page."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True)
    if isinstance(data, list) and all(isinstance(item, BaseModel) for item in data):
        return [item.model_dump(mode="json", by_alias=True) for item in data]
    return jsonable_encoder(data, by_alias=True)


def _envelope(request: Request, data: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": data,
        "metadata": {"requestId": request_id_of(request), **metadata},
        "timestamp": utc_now_iso(),
    }


def _page_metadata(limit: int, next_cursor: str | None) -> dict[str, Any]:
    return {"limit": limit, "nextCursor": next_cursor, "hasMore": next_cursor is not None}


def ok(request: Request, data: Any, **metadata: Any) -> dict[str, Any]:
    """`{"data", "metadata", "timestamp"}` for one item."""
    return _envelope(request, encode(data), metadata)


def page(
    request: Request, items: Sequence[Any], *, limit: int, next_cursor: str | None
) -> dict[str, Any]:
    """A list page with keyset metadata."""
    return ok(request, list(items), **_page_metadata(limit, next_cursor))


def json_response(body: dict[str, Any]) -> Response:
    """`body` encoded once by pydantic (models inside it too, by alias). Returned by a route,
    it skips FastAPI's validation of the body against the route's `response_model` (which
    still documents it): on a list page, a second pass over every item."""
    return Response(to_json(body, by_alias=True), media_type="application/json")


def ok_json(request: Request, data: Any, **metadata: Any) -> Response:
    """`ok` as a response: `data` is a model or a list of models."""
    return json_response(_envelope(request, data, metadata))


def page_json(
    request: Request, items: Sequence[Any], *, limit: int, next_cursor: str | None
) -> Response:
    """`page` as a response."""
    return ok_json(request, list(items), **_page_metadata(limit, next_cursor))


def error_body(
    request: Request, code: str, message: str, details: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    return {
        "error": {"code": code, "message": message, "details": jsonable_encoder(list(details))},
        "metadata": {"requestId": request_id_of(request)},
        "timestamp": utc_now_iso(),
    }
