"""Every error code the app defines, provoked by a real request through the real app over
real PostgreSQL (and Temporal): its status, the exact SPEC error envelope, the echoed request
id, `Retry-After` where SPEC asks for it, and nothing internal (stack trace, SQL, token) in the
body. The table of cases must name exactly the codes of `core/errors.py`, so a new code
without a case here fails."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from api.app import create_app
from core.errors import error_classes
from core.settings import Settings
from devtools.localservers import free_port
from tests.api.conftest import HOLD_INGEST_WRITER, bearer, serve_app
from tests.api.telemetry import event
from tests.api.test_release_registration import signed
from tests.api.test_rollout_control import create_rollout
from tests.factories import insert_signed_release, insert_vehicles

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

# What SPEC.md ("HTTP conventions") lists, with its statuses, plus the codes the app adds.
SPEC_CODES: dict[str, int] = {
    "VALIDATION_ERROR": 422,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "INVALID_STATE_TRANSITION": 409,
    "IDEMPOTENCY_KEY_IN_USE": 409,
    "IDEMPOTENCY_KEY_MISMATCH": 422,
    "SAFETY_POLICY_WEAKENED": 422,
    "RELEASE_SIGNATURE_INVALID": 422,
    "RATE_LIMITED": 429,
    "OVERLOADED": 503,
    "INTERNAL": 500,
}
EXTRA_CODES: dict[str, int] = {
    "METHOD_NOT_ALLOWED": 405,
    "PAYLOAD_TOO_LARGE": 413,
    "UNAVAILABLE": 503,
}
NEEDS_RETRY_AFTER = {"RATE_LIMITED", "OVERLOADED", "UNAVAILABLE", "IDEMPOTENCY_KEY_IN_USE"}
SECRET = "s3cr3t-" + uuid.uuid4().hex  # put where an exception or error could echo it
LEAKS = (
    "Traceback",
    'File "',
    "sqlalchemy",
    "psycopg",
    "asyncpg",
    "SELECT ",
    "INSERT ",
    "postgresql://",
    "password",
    SECRET,
)


def app_codes() -> dict[str, int]:
    """Every (code, status) the error module defines: MotorcadeError and its subclasses."""
    return {cls.code: cls.status for cls in error_classes()}


def test_the_cases_cover_exactly_the_codes_of_the_app() -> None:
    assert {**SPEC_CODES, **EXTRA_CODES} == app_codes()
    assert set(CASES) == set(app_codes())


@dataclass
class Ctx:
    http: httpx.AsyncClient
    operator: dict[str, str]
    viewer: dict[str, str]
    token: Callable[..., str]
    api_settings: Settings
    database_url: str
    prefix: str
    signing_key: Ed25519PrivateKey
    request_id: str = field(default_factory=lambda: f"err-{uuid.uuid4().hex}")
    tokens: list[str] = field(default_factory=list)  # every token sent: none may come back

    def h(self, headers: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """The headers of the request under test: ours, with this case's X-Request-ID."""
        headers = {**(headers or {}), **extra, "X-Request-ID": self.request_id}
        auth = headers.get("Authorization", "")
        if auth:
            self.tokens.append(auth.partition(" ")[2])
        return headers


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An app instance (built here, maybe with an extra route) served like conftest's."""
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


async def validation_error(c: Ctx) -> httpx.Response:
    return await c.http.get("/api/v1/vehicles?limit=0", headers=c.h(c.viewer))


async def unauthenticated(c: Ctx) -> httpx.Response:
    # A token that is not valid: it must not be echoed back in the message.
    bogus = f"{SECRET}.{SECRET}.{SECRET}"
    return await c.http.get("/api/v1/vehicles", headers=c.h(bearer(bogus)))


async def forbidden(c: Ctx) -> httpx.Response:
    return await c.http.post("/api/v1/desired-states", headers=c.h(c.viewer), json={})


async def not_found(c: Ctx) -> httpx.Response:
    return await c.http.get(f"/api/v1/vehicles/{c.prefix}missing", headers=c.h(c.viewer))


async def method_not_allowed(c: Ctx) -> httpx.Response:
    return await c.http.delete("/api/v1/vehicles", headers=c.h(c.viewer))


async def conflict(c: Ctx) -> httpx.Response:
    body = signed(c.signing_key, f"{c.prefix}2029.1.0")
    first = await c.http.post("/api/v1/releases", json=body, headers=c.operator)
    assert first.status_code == 201, first.text
    return await c.http.post("/api/v1/releases", json=body, headers=c.h(c.operator))


async def invalid_state_transition(c: Ctx) -> httpx.Response:
    rid = await create_rollout(c.http, c.operator, c.database_url, c.signing_key, c.prefix)
    with psycopg.connect(c.database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rid,))
    return await c.http.post(
        f"/api/v1/rollouts/{rid}/pause", headers=c.h(c.operator), json={"reason": "late"}
    )


def ds_body(c: Ctx, ids: list[str], reason: str = "hotfix") -> dict[str, Any]:
    release = f"{c.prefix}2029.2.0"
    return {"releaseVersion": release, "targets": {"vehicleIds": ids}, "reason": reason}


def ds_fleet(c: Ctx) -> list[str]:
    insert_signed_release(c.database_url, c.signing_key, f"{c.prefix}2029.2.0")
    ids = [f"{c.prefix}{i}" for i in range(2)]
    insert_vehicles(c.database_url, ids, release="old")
    return ids


async def idempotency_key_in_use(c: Ctx) -> httpx.Response:
    """The first request is held inside its transaction by a row lock taken here, so the
    duplicate certainly arrives while the first is in flight."""
    ids = ds_fleet(c)
    key = str(uuid.uuid4())
    keyed = {**c.operator, "Idempotency-Key": key}
    lock = psycopg.connect(c.database_url)
    try:
        lock.execute("SELECT id FROM vehicles WHERE id = %s FOR UPDATE", (ids[0],))
        first = asyncio.create_task(
            c.http.post("/api/v1/desired-states", headers=keyed, json=ds_body(c, ids))
        )
        for _ in range(600):
            with psycopg.connect(c.database_url) as conn:
                held = conn.execute(
                    "SELECT 1 FROM idempotency_keys WHERE key = %s", (key,)
                ).fetchone()
            if held or first.done():
                break
            await asyncio.sleep(0.05)
        assert not first.done(), first.result().text
        duplicate = await c.http.post(
            "/api/v1/desired-states", headers=c.h(keyed), json=ds_body(c, ids)
        )
    finally:
        lock.rollback()
        lock.close()
    assert (await first).status_code == 201
    return duplicate


async def idempotency_key_mismatch(c: Ctx) -> httpx.Response:
    ids = ds_fleet(c)
    keyed = {**c.operator, "Idempotency-Key": str(uuid.uuid4())}
    first = await c.http.post("/api/v1/desired-states", headers=keyed, json=ds_body(c, ids))
    assert first.status_code == 201, first.text
    return await c.http.post(
        "/api/v1/desired-states", headers=c.h(keyed), json=ds_body(c, ids, reason="other")
    )


async def safety_policy_weakened(c: Ctx) -> httpx.Response:
    ids = ds_fleet(c)
    weak = {**ds_body(c, ids), "safetyChecks": {"requireStationary": False}}
    return await c.http.post("/api/v1/desired-states", headers=c.h(c.operator), json=weak)


async def release_signature_invalid(c: Ctx) -> httpx.Response:
    body = signed(c.signing_key, f"{c.prefix}2029.3.0")
    body["artifactDigest"] = "sha256:" + "ef" * 32  # changed after signing
    return await c.http.post("/api/v1/releases", json=body, headers=c.h(c.operator))


async def payload_too_large(c: Ctx) -> httpx.Response:
    vid = f"{c.prefix}0"
    insert_vehicles(c.database_url, [vid])
    many = {"events": [event(vid, s, "apply_start") for s in range(1, 1002)]}
    return await c.http.post(
        "/api/v1/telemetry", json=many, headers=c.h(bearer(c.token("gateway")))
    )


async def rate_limited(c: Ctx) -> httpx.Response:
    settings = c.api_settings.model_copy(
        update={"rate_limit_write_burst": 1, "rate_limit_writes_per_minute": 1}
    )
    caller = bearer(c.token("operator", subject=f"{c.prefix}limited"))
    async with serve_app(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await client.post("/api/v1/desired-states", headers=caller, json={})
        assert first.status_code == 422, first.text
        return await client.post("/api/v1/desired-states", headers=c.h(caller), json={})


async def overloaded(c: Ctx) -> httpx.Response:
    """As tests/api/telemetry/test_endpoints.py: a tiny ingest queue whose writer is held on
    a lock."""
    settings = c.api_settings.model_copy(
        update={"ingest_queue_max_items": 600, "ingest_writers": 1}
    )
    gateway = bearer(c.token("gateway"))
    vid = f"{c.prefix}0"
    insert_vehicles(c.database_url, [vid], release="1.0")
    first = {"events": [event(vid, s, "apply_start") for s in range(1, 501)]}
    second = {"events": [event(vid, s, "apply_start") for s in range(501, 1001)]}
    async with serve(create_app(settings)) as client:
        blocker = await psycopg.AsyncConnection.connect(c.database_url)
        try:
            await blocker.execute(HOLD_INGEST_WRITER)
            pending = asyncio.create_task(
                client.post("/api/v1/telemetry", json=first, headers=gateway)
            )
            await asyncio.sleep(0.5)
            refused = await client.post("/api/v1/telemetry", json=second, headers=c.h(gateway))
        finally:
            await blocker.rollback()
            await blocker.close()
        assert (await pending).status_code == 202
    return refused


async def unavailable(c: Ctx) -> httpx.Response:
    """Temporal unreachable: the control request is recorded but cannot be delivered."""
    rid = await create_rollout(c.http, c.operator, c.database_url, c.signing_key, c.prefix)
    settings = c.api_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with serve(create_app(settings)) as client:
        return await client.post(
            f"/api/v1/rollouts/{rid}/pause", headers=c.h(c.operator), json={"reason": "x"}
        )


async def internal_from_a_route(c: Ctx) -> httpx.Response:
    """An extra route on an instance of the real app raises a plain exception whose text
    holds SQL, a connection string and a secret: none of it may reach the client."""
    app = create_app(c.api_settings)

    async def boom() -> None:
        raise RuntimeError(
            f"SELECT password FROM users -- postgresql://postgres:{SECRET}@db/x\n"
            'Traceback (most recent call last):\n  File "x.py"'
        )

    app.add_api_route("/api/v1/_boom", boom, methods=["GET"])
    async with serve(app) as client:
        return await client.get("/api/v1/_boom", headers=c.h(c.viewer))


async def internal(c: Ctx) -> httpx.Response:
    """Two honest failures: a route that raises (above), checked here; then the one the
    parametrized test checks, the database failing under a real route (the app points at a
    database that does not exist, whose name holds the secret)."""
    first = await internal_from_a_route(c)
    assert first.status_code == 500, first.text
    assert first.json()["error"] == {"code": "INTERNAL", "message": "internal error", "details": []}
    assert first.json()["metadata"] == {"requestId": c.request_id}
    assert first.headers["x-request-id"] == c.request_id
    assert not any(leak in first.text for leak in LEAKS), first.text
    c.request_id = f"err-{uuid.uuid4().hex}"
    missing = f"motorcade_{SECRET.replace('-', '_')}"
    # The same server (TCP or a socket directory in the query), another database's name: the
    # server refuses it (FATAL), a 500. An unreachable server would be 503 UNAVAILABLE.
    url = urlunsplit(urlsplit(c.api_settings.database_url)._replace(path=f"/{missing}"))
    settings = c.api_settings.model_copy(update={"database_url": url, "api_ingest": False})
    async with serve(create_app(settings)) as client:
        return await client.get("/api/v1/vehicles", headers=c.h(c.viewer))


CASES: dict[str, Callable[[Ctx], Awaitable[httpx.Response]]] = {
    "VALIDATION_ERROR": validation_error,
    "UNAUTHENTICATED": unauthenticated,
    "FORBIDDEN": forbidden,
    "NOT_FOUND": not_found,
    "METHOD_NOT_ALLOWED": method_not_allowed,
    "CONFLICT": conflict,
    "INVALID_STATE_TRANSITION": invalid_state_transition,
    "IDEMPOTENCY_KEY_IN_USE": idempotency_key_in_use,
    "IDEMPOTENCY_KEY_MISMATCH": idempotency_key_mismatch,
    "SAFETY_POLICY_WEAKENED": safety_policy_weakened,
    "RELEASE_SIGNATURE_INVALID": release_signature_invalid,
    "PAYLOAD_TOO_LARGE": payload_too_large,
    "RATE_LIMITED": rate_limited,
    "OVERLOADED": overloaded,
    "UNAVAILABLE": unavailable,
    "INTERNAL": internal,
}


@pytest.mark.parametrize("code", sorted(CASES))
async def test_each_error_code_has_the_spec_envelope(
    code: str,
    http: httpx.AsyncClient,
    operator: dict[str, str],
    viewer: dict[str, str],
    token: Callable[..., str],
    api_settings: Settings,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    ctx = Ctx(http, operator, viewer, token, api_settings, database_url, prefix, signing_key)
    response = await CASES[code](ctx)

    assert response.status_code == app_codes()[code], response.text
    body = response.json()
    assert set(body) == {"error", "metadata", "timestamp"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], list)
    assert all(isinstance(d, dict) for d in body["error"]["details"])
    assert body["metadata"] == {"requestId": ctx.request_id}
    assert response.headers["x-request-id"] == ctx.request_id
    assert ISO_Z.match(body["timestamp"]), body["timestamp"]
    assert response.headers["content-type"].startswith("application/json")
    if code in NEEDS_RETRY_AFTER:
        assert int(response.headers["retry-after"]) >= 1
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text)
    for sent in ctx.tokens:
        assert sent not in response.text
