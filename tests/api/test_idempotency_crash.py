"""The API killed after its route's transaction committed but before the Idempotency-Key's
record was written: the retry, on a fresh API process, does not run the work again. It
answers the rollout the first request created (201, re-read), and exactly one rollout exists.

Real processes (`motorcade api`), real PostgreSQL, SIGKILL. The first API's Temporal is a
socket that never answers, so its route stops right after the commit (starting the
workflow); the test then holds the key's row lock (the record write waits on it) and kills
the process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.settings import Settings
from devtools.localservers import free_port, start_role_process, stop_process, wait_http_ready
from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import insert_signed_release, insert_vehicles


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a hung Temporal)."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_retry_after_a_crash_between_commit_and_record_runs_nothing_twice(
    api_settings: Settings,
    database_url: str,
    dev_key: str,
    operator: dict,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    silent_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = f"{prefix}2027.7.0"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(3)]
    insert_vehicles(database_url, ids, release="old")
    name = f"crash {uuid.uuid4()}"
    body = rollout_body(release, name=name, targets={"vehicleIds": ids})
    key = str(uuid.uuid4())
    headers = {**operator, "Idempotency-Key": key}
    assert api_settings.trusted_keys_file is not None
    monkeypatch.setenv("MOTORCADE_TRUSTED_KEYS_FILE", api_settings.trusted_keys_file)
    monkeypatch.setenv("MOTORCADE_DATABASE_API_LOCK_TIMEOUT_SECONDS", "0")  # wait on the test

    def key_state() -> tuple | None:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT state, executed_at IS NOT NULL, resource FROM idempotency_keys"
                " WHERE caller = 'dev-operator' AND key = %s",
                (key,),
            ).fetchone()

    def created_rollouts() -> list[tuple]:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT id FROM rollouts WHERE name = %s", (name,)).fetchall()

    monkeypatch.setenv("MOTORCADE_TEMPORAL_ADDRESS", f"127.0.0.1:{silent_port}")
    port = free_port()
    first_api = start_role_process("api", database_url, dev_key, port, quiet=True)
    lock = psycopg.connect(database_url)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http_ready(base, path="/healthz")
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            first = asyncio.create_task(http.post("/api/v1/rollouts", headers=headers, json=body))
            for _ in range(1200):  # until the route's transaction committed (bounded, untimed)
                if created_rollouts() or first.done():
                    break
                await asyncio.sleep(0.02)
            assert not first.done(), first.result().text
            # Hold the key's row: the record write (complete or release) waits on it.
            held = lock.execute(
                "SELECT state FROM idempotency_keys WHERE caller = 'dev-operator' AND key = %s"
                " FOR UPDATE",
                (key,),
            ).fetchone()
            assert held == ("in_flight",), "the record was written before the test held it"
            os.killpg(first_api.pid, signal.SIGKILL)
            first_api.wait()
            with contextlib.suppress(httpx.HTTPError):
                await first
    finally:
        lock.rollback()
        lock.close()
        if first_api.poll() is None:
            os.killpg(first_api.pid, signal.SIGKILL)
            first_api.wait()
    rollouts = created_rollouts()
    assert len(rollouts) == 1
    (rollout_id,) = rollouts[0]
    state = key_state()  # committed with the work: the key is executed, with what it created
    with psycopg.connect(database_url) as conn:
        # Long after: a stale in-flight key would be taken over by the retry.
        conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '1 hour'"
            " WHERE caller = 'dev-operator' AND key = %s",
            (key,),
        )

    monkeypatch.setenv("MOTORCADE_TEMPORAL_ADDRESS", api_settings.temporal_address)
    port = free_port()
    fresh_api = start_role_process("api", database_url, dev_key, port, quiet=True)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http_ready(base, path="/healthz")
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            retry = await http.post("/api/v1/rollouts", headers=headers, json=body)
            again = await http.post("/api/v1/rollouts", headers=headers, json=body)
    finally:
        stop_process(fresh_api)
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["location"] == f"/api/v1/rollouts/{rollout_id}"
    assert retry.json()["data"]["id"] == rollout_id
    assert retry.json()["data"]["name"] == name
    assert again.status_code == 201 and again.json()["data"]["id"] == rollout_id
    with psycopg.connect(database_url) as conn:
        count = conn.execute("SELECT count(*) FROM rollouts WHERE name = %s", (name,)).fetchone()
        created = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'rollout.created' AND target_id = %s",
            (str(rollout_id),),
        ).fetchone()
    assert count == (1,)  # the work ran once
    assert created == (1,)
    assert state == ("in_flight", True, f"/api/v1/rollouts/{rollout_id}")
