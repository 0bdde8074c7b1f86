"""Request bodies are bounded on every route, and an unauthenticated caller's body is never
read: the real app (its lifespan over real PostgreSQL and Temporal) driven through ASGI with a
`receive` that counts the body it hands out, and served by uvicorn for what a socket shows
(an answer sent before the client has sent its body)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from core.settings import Settings
from tests.api.conftest import bearer, serve_app
from tests.api.test_envelopes import assert_error

LIMIT = 16 * 1024  # MOTORCADE_MAX_BODY_BYTES of the app under test
GUARD = 30  # seconds: a guard against a server that waits for a body, never an assertion


@dataclass
class Exchange:
    """One request through the app's ASGI callable: what it asked for and answered."""

    given: int = 0  # body bytes handed to the app
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


async def exchange(
    app: FastAPI,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    chunks: list[bytes] = (),  # type: ignore[assignment]
) -> Exchange:
    """Call the app as a server would, the body in `chunks` (more_body between them)."""
    result = Exchange()
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            result.given += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")

    path_only, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return result


def assert_envelope(result: Exchange, status: int, code: str) -> dict[str, Any]:
    assert result.status == status, result.body[:500]
    body = result.json()
    assert set(body) == {"error", "metadata", "timestamp"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["metadata"]["requestId"] == result.headers["x-request-id"]
    return body


@pytest.fixture(scope="module")
def limited_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"max_body_bytes": LIMIT})


@pytest.fixture
async def app(limited_settings: Settings) -> AsyncIterator[FastAPI]:
    """The real app with its lifespan running (database, Temporal, token verifier)."""
    application = create_app(limited_settings)
    async with application.router.lifespan_context(application):
        yield application


def pieces(total: int, size: int = 64 * 1024) -> list[bytes]:
    return [b"x" * min(size, total - start) for start in range(0, total, size)]


async def test_an_unauthenticated_body_is_never_read(app: FastAPI) -> None:
    json_type = {"Content-Type": "application/json"}
    # A declared 2 GB body: 413 at once, before anything reads it or verifies a token.
    huge = await exchange(
        app,
        "POST",
        "/api/v1/rollouts",
        headers={**json_type, "Content-Length": str(2 * 1024**3)},
        chunks=pieces(LIMIT * 4),
    )
    assert_envelope(huge, 413, "PAYLOAD_TOO_LARGE")
    assert huge.given == 0
    # Small enough, or not declared at all (chunked): 401 before a byte of it is read.
    for extra in ({"Content-Length": "100"}, {}):
        result = await exchange(
            app,
            "POST",
            "/api/v1/rollouts",
            headers={**json_type, **extra},
            chunks=[b'{"releaseVersion": "1.0", "pad": "' + b"x" * 64 + b'"}'],
        )
        assert_envelope(result, 401, "UNAUTHENTICATED")
        assert result.given == 0
    # A token that does not verify: the same, with the verifier's reason.
    forged = await exchange(
        app,
        "POST",
        "/api/v1/vehicles",
        headers={**json_type, "Authorization": "Bearer not.a.jwt"},
        chunks=pieces(LIMIT // 2),
    )
    assert_envelope(forged, 401, "UNAUTHENTICATED")
    assert forged.given == 0
    # Every method under /api/ is gated, reads included; outside it the routes decide.
    listing = await exchange(app, "GET", "/api/v1/vehicles", chunks=pieces(LIMIT // 2))
    assert_envelope(listing, 401, "UNAUTHENTICATED")
    assert listing.given == 0
    probe = await exchange(app, "GET", "/healthz")
    assert probe.status == 200


async def test_a_streamed_body_is_cut_at_the_limit(app: FastAPI, token: Callable[..., str]) -> None:
    operator = bearer(token("operator", subject=f"op-{uuid.uuid4()}"))
    json_type = {"Content-Type": "application/json"}
    # Chunked (no Content-Length), and a Content-Length that lies: counted as it arrives.
    for declared in ({}, {"Content-Length": "10"}):
        result = await exchange(
            app,
            "POST",
            "/api/v1/rollouts",
            headers={**operator, **json_type, **declared},
            chunks=pieces(LIMIT * 64, size=4096),
        )
        body = assert_envelope(result, 413, "PAYLOAD_TOO_LARGE")
        assert str(LIMIT) in body["error"]["message"]
        assert result.given <= LIMIT + 4096  # cut at the first chunk past the limit
    # A keyed POST (the idempotency middleware reads the body itself) has the same limit.
    keyed = await exchange(
        app,
        "POST",
        "/api/v1/desired-states",
        headers={**operator, **json_type, "Idempotency-Key": str(uuid.uuid4())},
        chunks=pieces(LIMIT * 8, size=4096),
    )
    assert_envelope(keyed, 413, "PAYLOAD_TOO_LARGE")
    assert keyed.given <= LIMIT + 4096


async def test_telemetry_keeps_its_larger_limit(
    app: FastAPI, token: Callable[..., str], limited_settings: Settings
) -> None:
    gateway = {**bearer(token("gateway")), "Content-Type": "application/json"}
    # Past the default limit, within telemetry's: read and judged by the route (422: the
    # unknown field), not refused for its size.
    padded = b'{"events": [], "pad": "' + b"x" * (LIMIT * 4) + b'"}'
    result = await exchange(app, "POST", "/api/v1/telemetry", headers=gateway, chunks=[padded])
    assert_envelope(result, 422, "VALIDATION_ERROR")
    over = limited_settings.telemetry_max_body_bytes + 1
    result = await exchange(
        app,
        "POST",
        "/api/v1/telemetry",
        headers={**gateway, "Content-Length": str(over)},
        chunks=pieces(over),
    )
    assert_envelope(result, 413, "PAYLOAD_TOO_LARGE")
    assert result.given == 0


async def head_of_answer(url: str, request: bytes) -> bytes:
    """Send `request` (headers only, the body it announces never sent) and read the answer's
    head: the server answers without waiting for the body, or the guard fails the test."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(GUARD):
            head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        async with asyncio.timeout(GUARD):
            return head + await reader.readexactly(length)
    finally:
        writer.close()


async def test_over_the_network_the_answer_comes_before_the_body(
    limited_settings: Settings,
) -> None:
    async with serve_app(limited_settings) as url:
        for length, status, code in (
            (2 * 1024**3, b"413", b"PAYLOAD_TOO_LARGE"),  # too large: not even authenticated
            (LIMIT // 2, b"401", b"UNAUTHENTICATED"),  # no token: its body is not awaited
        ):
            answer = await head_of_answer(
                url,
                b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                + f"\r\nContent-Length: {length}\r\n\r\n".encode(),
            )
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
            assert code in answer
        async with httpx.AsyncClient(base_url=url, timeout=GUARD) as client:
            response = await client.post("/api/v1/rollouts", content=b"x" * (LIMIT + 1))
            assert_error(response, 413, "PAYLOAD_TOO_LARGE")
