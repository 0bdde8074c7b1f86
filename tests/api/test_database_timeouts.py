"""A slow or saturated database answers 503 UNAVAILABLE with Retry-After, never a 500 nor an
endless wait: a lock wait past `lock_timeout`, a statement past `statement_timeout`, no pooled
connection within the pool timeout. /readyz answers without a connection of the request pool.

The database is made slow with a lock the test holds (SIGSTOP of the shared PostgreSQL is not
an option): the fleet-assignment advisory lock that every writer of desired states and
rollouts takes first (services/assignment.lock_fleet_assignment)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.db import role_timeouts
from core.settings import Settings
from services.assignment import FLEET_ASSIGNMENT_LOCK
from tests.api.conftest import bearer, serve_app
from tests.api.telemetry import heartbeat
from tests.api.test_envelopes import assert_error
from tests.factories import insert_signed_release, insert_vehicles


def named(settings: Settings, name: str, **update: Any) -> Settings:
    """`settings` whose connections carry `application_name=name` (to find them)."""
    url = settings.database_url
    return settings.model_copy(
        update={
            "database_url": f"{url}{'&' if '?' in url else '?'}application_name={name}",
            **update,
        }
    )


@contextmanager
def assignment_lock_held(database_url: str) -> Iterator[None]:
    """The fleet-assignment lock, held by the test in an open transaction."""
    conn = psycopg.connect(database_url)
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (FLEET_ASSIGNMENT_LOCK,))
        yield
    finally:
        conn.rollback()
        conn.close()


def waiting_on_the_lock(database_url: str, name: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            (name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def desired(database_url: str, prefix: str, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A direct desired state for this test's vehicles (it takes the assignment lock)."""
    release = f"{prefix}2027.9.0"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(2)]
    insert_vehicles(database_url, ids, release="old")
    return {"releaseVersion": release, "targets": {"vehicleIds": ids}, "reason": "timeouts"}


@asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield http


def test_each_role_has_its_timeouts(settings: Settings) -> None:
    api = role_timeouts(settings, "api")
    assert api == {
        "statement_timeout": 15_000,
        "lock_timeout": 5_000,
        "idle_in_transaction_session_timeout": 60_000,
    }
    assert role_timeouts(settings, "worker")["statement_timeout"] == 120_000
    listen = role_timeouts(settings, "listen")
    assert listen["idle_in_transaction_session_timeout"] == 0 and listen["lock_timeout"] == 0
    assert set(role_timeouts(settings, "migrate").values()) == {0}


@pytest.mark.parametrize(
    ("statement", "lock", "sqlstate"),
    [(30, 0.5, "55P03 lock_not_available"), (0.5, 0, "57014 query_canceled")],
)
async def test_a_lock_or_statement_timeout_answers_503(
    api_settings: Settings,
    database_url: str,
    operator: dict,
    desired: dict[str, Any],
    statement: float,
    lock: float,
    sqlstate: str,
) -> None:
    """A write blocked on the fleet-assignment lock (held by the test) ends at its lock or
    statement timeout: 503 UNAVAILABLE with Retry-After, the transaction rolled back; once
    the lock is free the same request succeeds."""
    settings = api_settings.model_copy(
        update={
            "database_api_statement_timeout_seconds": statement,
            "database_api_lock_timeout_seconds": lock,
        }
    )
    async with client(settings) as http:
        with assignment_lock_held(database_url):
            blocked = await http.post("/api/v1/desired-states", headers=operator, json=desired)
        assert_error(blocked, 503, "UNAVAILABLE")
        assert int(blocked.headers["Retry-After"]) >= 1, sqlstate
        done = await http.post("/api/v1/desired-states", headers=operator, json=desired)
        assert done.status_code == 201, done.text


async def test_an_exhausted_pool_answers_503_and_readyz_still_answers(
    api_settings: Settings,
    database_url: str,
    operator: dict,
    viewer: dict,
    token: Callable[..., str],
    desired: dict[str, Any],
    prefix: str,
) -> None:
    """Pool size 1 (two connections with the overflow): two writes hold both, blocked on the
    lock the test holds. Then a read, a keyed write (its Idempotency-Key claim needs a
    connection first) and telemetry each answer 503 UNAVAILABLE with Retry-After after the
    pool timeout, never a 500; /readyz reports `pool` exhausted while the database itself,
    reached on the probe's own connection, is `ok`, and stays ready (200): a load spike on
    every replica must not make a balancer pull them all."""
    name = f"motorcade-pool-{prefix}"[:60]
    settings = named(
        api_settings,
        name,
        database_pool_size=1,
        database_pool_timeout_seconds=0.5,
        database_api_lock_timeout_seconds=60,
        database_api_statement_timeout_seconds=60,
        api_ingest=True,
    )
    vehicle = desired["targets"]["vehicleIds"][0]
    async with client(settings) as http:
        with assignment_lock_held(database_url):
            holders = [
                asyncio.create_task(
                    http.post("/api/v1/desired-states", headers=operator, json=desired)
                )
                for _ in range(2)
            ]
            for _ in range(600):  # until both hold a connection, waiting (bounded, not timed)
                if waiting_on_the_lock(database_url, name) == 2:
                    break
                await asyncio.sleep(0.05)
            assert waiting_on_the_lock(database_url, name) == 2

            read = await http.get(f"/api/v1/vehicles/{vehicle}", headers=viewer)
            assert_error(read, 503, "UNAVAILABLE")
            assert read.headers["Retry-After"] == "2"
            keyed = await http.post(
                "/api/v1/desired-states",
                headers={**operator, "Idempotency-Key": str(uuid.uuid4())},
                json=desired,
            )
            assert_error(keyed, 503, "UNAVAILABLE")
            assert keyed.headers["Retry-After"] == "2"
            telemetry = await http.post(
                "/api/v1/telemetry",
                headers=bearer(token("gateway")),
                json={"heartbeats": [heartbeat(vehicle)]},
            )
            assert_error(telemetry, 503, "UNAVAILABLE")
            assert telemetry.headers["Retry-After"] == "2"
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data"]["checks"]["database"] == "ok"
            assert ready.json()["data"]["checks"]["pool"] == "exhausted"
            assert not any(h.done() for h in holders)
        answers = await asyncio.gather(*holders)
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        assert (await http.get(f"/api/v1/vehicles/{vehicle}", headers=viewer)).status_code == 200
        assert (await http.get("/readyz")).json()["data"]["checks"]["pool"] == "ok"


async def test_readyz_answers_when_nothing_answers_it(api_settings: Settings) -> None:
    """PostgreSQL and Temporal both accept connections and never answer (a stalled host):
    /readyz still answers, 503 with both unavailable (each check is bounded, connecting
    included)."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = api_settings.model_copy(
        update={
            "database_url": f"postgresql://postgres@127.0.0.1:{port}/stalled",
            "temporal_address": f"127.0.0.1:{port}",
        }
    )
    try:
        async with client(settings) as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["data"]["checks"] == {
            "database": "unavailable",
            "temporal": "unavailable",
            "pool": "ok",
        }
    finally:
        silent.close()
