"""The API process killed (SIGKILL) after the route committed its work and before it recorded
the response under the request's Idempotency-Key. The client never got an answer, so it
retries with the same key, on a fresh API process, for as long as it is told the key is in
use: the work must not run twice; the retry answers the original outcome or a 409.

No test hook in the product: the test holds locks from its own connections. The route's
table (`desired_states`) is locked so the request waits after its key is claimed; the key's
row is then locked, the route's lock released: the route commits, and the middleware's write
of the response waits on the key's row. That is when the process is killed. (Where the
route's own transaction marks the key executed, that transaction waits on the row instead,
uncommitted: the kill rolls the work back with it, and the retry may then run it, once.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from core.auth import mint_dev_token
from devtools.localservers import free_port, start_role_process, stop_process, wait_http_ready
from models.enums import Role
from services.signing import generate_signing_key, write_trusted_keys_file
from tests.factories import desired_states_issued, insert_signed_release, insert_vehicles

pytestmark = pytest.mark.slow

IN_FLIGHT_TIMEOUT = 30  # MOTORCADE_IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS (its minimum)


def _poll(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _one(url: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


async def test_a_retry_after_a_crash_between_commit_and_record_does_not_run_twice(
    own_database: str,
    dev_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = own_database
    signing_key = generate_signing_key()
    keys_file = tmp_path / "trusted-keys.json"
    write_trusted_keys_file(keys_file, [signing_key.public_key()])
    monkeypatch.setenv("MOTORCADE_TRUSTED_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("MOTORCADE_IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS", str(IN_FLIGHT_TIMEOUT))
    prefix = f"IDC{uuid.uuid4().hex[:5]}-"
    release = f"{prefix}2027.1.0"
    insert_signed_release(db, signing_key, release)
    model = f"{prefix}m"
    vids = [f"{prefix}{i}" for i in range(5)]
    insert_vehicles(db, vids, model=model, release="old")

    key = f"crash-{uuid.uuid4()}"
    headers = {
        "Authorization": f"Bearer {mint_dev_token(dev_key, role=Role.OPERATOR)}",
        "Idempotency-Key": key,
    }
    body = {"releaseVersion": release, "targets": {"models": [model]}, "reason": "hotfix"}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc: subprocess.Popen[bytes] = start_role_process("api", db, dev_key, port, quiet=True)
    route_lock = psycopg.connect(db)
    key_lock = psycopg.connect(db)
    try:
        await wait_http_ready(base, path="/healthz", within=60)
        # 1. The route's work waits (its table locked by the test).
        route_lock.execute("LOCK TABLE desired_states IN EXCLUSIVE MODE")
        client = httpx.AsyncClient(base_url=base, timeout=60)
        first = asyncio.create_task(
            client.post("/api/v1/desired-states", json=body, headers=headers)
        )
        # 2. Once the key is claimed (committed), the test locks its row ...
        await asyncio.to_thread(
            _poll,
            lambda: _one(db, "SELECT count(*) FROM idempotency_keys WHERE key = %s", (key,)) == 1,
            "the key's claim",
        )
        key_lock.execute("SELECT 1 FROM idempotency_keys WHERE key = %s FOR UPDATE", (key,))
        # ... and lets the route go: it commits, then its response's record waits on the row
        # (or, where the route's own transaction writes the key, that transaction waits).
        route_lock.rollback()
        await asyncio.to_thread(
            _poll,
            lambda: bool(
                _one(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND query ILIKE '%%idempotency_keys%%'",
                )
            ),
            "a write of the key to wait on its row",
        )
        # (5, 1): the work is committed, only the record is missing
        committed = desired_states_issued(db, release, vids)
        assert committed in ((0, 0), (len(vids), 1)), committed
        assert not first.done()  # the client has no answer yet
        # 3. The API dies between its commit and the record of its response.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with pytest.raises(httpx.HTTPError):
            await first
        await client.aclose()
        key_lock.rollback()
        # 4. A fresh API process; the client retries under the same key, waiting while it is
        # told the key is in use, for longer than the in-flight timeout.
        proc = start_role_process("api", db, dev_key, port, quiet=True)
        await wait_http_ready(base, path="/healthz", within=60)
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + IN_FLIGHT_TIMEOUT + 10
        async with httpx.AsyncClient(base_url=base, timeout=60) as retry_client:
            while True:
                r = await retry_client.post("/api/v1/desired-states", json=body, headers=headers)
                code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
                answers.append((r.status_code, code))
                if r.status_code != 409 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2)
    finally:
        route_lock.close()
        key_lock.close()
        stop_process(proc, timeout=10)
    print(f"\nidempotency crash: work at the kill {committed}, retry answers {answers}")
    # The work ran once: one desired state per vehicle, one audit entry.
    assert desired_states_issued(db, release, vids) == (len(vids), 1), (
        f"the retry ran the work again; answers {answers}"
    )
    # The retry answered the original outcome (replayed when the work had been committed at
    # the kill; the work itself when it had not) or a 409 about the key.
    status, code = answers[-1]
    replayed = r.headers.get("Idempotent-Replayed") == "true"
    assert (status == 201 and (replayed or committed == (0, 0))) or (
        status == 409 and code.startswith("IDEMPOTENCY")
    ), (committed, answers)
