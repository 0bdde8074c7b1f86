"""Idempotency-Key on POST, through the real app over real PostgreSQL: replay, mismatch,
a concurrent duplicate, per-caller keys, failures not stored, the telemetry exception, purge."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from core.db import IdempotencyGuard, idempotency_guard, note_created
from core.errors import IdempotencyKeyInUse
from core.settings import Settings
from devtools.localservers import free_port
from services import idempotency as service
from tests.api.conftest import bearer, serve_app
from tests.api.test_envelopes import assert_error
from tests.api.test_releases_and_rollouts import rollout_body
from tests.api.test_rollout_control import create_rollout
from tests.factories import (
    Sessions,
    desired_states_issued,
    insert_signed_release,
    insert_vehicles,
)

URL = "/api/v1/desired-states"


def ds_body(release: str, ids: list[str], reason: str = "hotfix") -> dict[str, Any]:
    return {"releaseVersion": release, "targets": {"vehicleIds": ids}, "reason": reason}


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def key_row(database_url: str, caller: str, key: str) -> tuple | None:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT state, response_status, request_hash, expires_at - created_at"
            " FROM idempotency_keys WHERE caller = %s AND key = %s",
            (caller, key),
        ).fetchone()


@pytest.fixture
def fleet(database_url: str, prefix: str, signing_key: Ed25519PrivateKey) -> tuple[str, list[str]]:
    release = f"{prefix}2027.5.0"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(3)]
    insert_vehicles(database_url, ids, release="old")
    return release, ids


async def test_replay_returns_the_first_response_and_writes_once(
    http: httpx.AsyncClient, operator: dict, database_url: str, fleet: tuple[str, list[str]]
) -> None:
    release, ids = fleet
    key = str(uuid.uuid4())
    first = await http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert desired_states_issued(database_url, release, ids) == (3, 1)

    # The same request (keys in another order: the same JSON) under the same key.
    reordered = dict(reversed(list(ds_body(release, ids).items())))
    again = await http.post(URL, headers=keyed(operator, key), json=reordered)
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # the original body, its request id included
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    # no second write, no second audit
    assert desired_states_issued(database_url, release, ids) == (3, 1)

    row = key_row(database_url, "dev-operator", key)
    assert row is not None
    state, status, request_hash, kept = row
    assert (state, status) == ("completed", 201)
    assert len(request_hash) == 64 and kept >= timedelta(hours=24)

    # Without a key, the same request is simply done again.
    plain = await http.post(URL, headers=operator, json=ds_body(release, ids))
    assert plain.status_code == 201 and "idempotent-replayed" not in plain.headers
    assert desired_states_issued(database_url, release, ids) == (6, 2)


async def test_a_validation_failure_is_not_stored(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    """A 422 (here an unknown release) saves nothing: the endpoint wrote nothing, so the key
    is released and the same request is judged again, not replayed (Stripe's rule)."""
    key = str(uuid.uuid4())
    body = ds_body(f"{prefix}no-such-release", [f"{prefix}0"])
    first = await http.post(URL, headers=keyed(operator, key), json=body)
    assert first.status_code in (404, 422), first.text
    assert key_row(database_url, "dev-operator", key) is None
    again = await http.post(URL, headers=keyed(operator, key), json=body)
    assert again.status_code == first.status_code
    assert "idempotent-replayed" not in again.headers
    assert again.json()["metadata"]["requestId"] != first.json()["metadata"]["requestId"]


async def test_an_overlap_conflict_is_not_replayed_once_the_other_rollout_ends(
    http: httpx.AsyncClient, operator: dict, database_url: str, fleet: tuple[str, list[str]]
) -> None:
    """A 409 CONFLICT (the vehicles are inside another active rollout) is not stored: once
    the other rollout ends, the same request under the same key creates the rollout."""
    release, ids = fleet
    holder = await http.post(
        "/api/v1/rollouts",
        headers=operator,
        json=rollout_body(release, targets={"vehicleIds": ids}),
    )
    assert holder.status_code == 201, holder.text
    key = str(uuid.uuid4())
    body = rollout_body(release, name=f"second {uuid.uuid4()}", targets={"vehicleIds": ids})
    refused = await http.post("/api/v1/rollouts", headers=keyed(operator, key), json=body)
    assert_error(refused, 409, "CONFLICT")
    assert key_row(database_url, "dev-operator", key) is None

    with psycopg.connect(database_url) as conn:  # the other rollout ends
        conn.execute(
            "UPDATE rollouts SET status = 'aborted' WHERE id = %s", (holder.json()["data"]["id"],)
        )
    created = await http.post("/api/v1/rollouts", headers=keyed(operator, key), json=body)
    assert created.status_code == 201, created.text
    assert "idempotent-replayed" not in created.headers
    replay = await http.post("/api/v1/rollouts", headers=keyed(operator, key), json=body)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == created.json()


async def test_same_key_with_another_body_is_a_mismatch(
    http: httpx.AsyncClient, operator: dict, database_url: str, fleet: tuple[str, list[str]]
) -> None:
    release, ids = fleet
    key = str(uuid.uuid4())
    first = await http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
    assert first.status_code == 201, first.text
    other = await http.post(
        URL, headers=keyed(operator, key), json=ds_body(release, ids, reason="other")
    )
    assert_error(other, 422, "IDEMPOTENCY_KEY_MISMATCH")
    # Another path under the same key is another request too.
    dry = await http.post(
        "/api/v1/rollouts?dryRun=true", headers=keyed(operator, key), json=ds_body(release, ids)
    )
    assert_error(dry, 422, "IDEMPOTENCY_KEY_MISMATCH")
    assert desired_states_issued(database_url, release, ids) == (3, 1)


async def test_a_concurrent_duplicate_is_in_use(
    http: httpx.AsyncClient, operator: dict, database_url: str, fleet: tuple[str, list[str]]
) -> None:
    """The first request is held inside its transaction (a vehicle it must update is locked
    here), so the duplicate certainly arrives while the first is in flight."""
    release, ids = fleet
    key = str(uuid.uuid4())
    lock = psycopg.connect(database_url)
    try:
        lock.execute("SELECT id FROM vehicles WHERE id = %s FOR UPDATE", (ids[0],))
        first = asyncio.create_task(
            http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
        )
        for _ in range(600):  # until the first request holds the key (bounded, not timed)
            row = key_row(database_url, "dev-operator", key)
            if row is not None or first.done():
                break
            await asyncio.sleep(0.05)
        assert not first.done(), first.result().text
        assert row is not None and row[0] == "in_flight"

        duplicate = await http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
        assert_error(duplicate, 409, "IDEMPOTENCY_KEY_IN_USE")
        assert duplicate.headers["retry-after"]
        assert not first.done()
    finally:
        lock.rollback()
        lock.close()
    response = await first
    assert response.status_code == 201, response.text
    replay = await http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
    assert replay.status_code == 201 and replay.json() == response.json()
    assert desired_states_issued(database_url, release, ids) == (3, 1)


async def test_keys_are_scoped_to_the_caller(
    http: httpx.AsyncClient,
    operator: dict,
    token: Any,
    database_url: str,
    fleet: tuple[str, list[str]],
) -> None:
    release, ids = fleet
    key = str(uuid.uuid4())
    alice = bearer(token("operator", subject=f"alice-{key}"))
    first = await http.post(URL, headers=keyed(operator, key), json=ds_body(release, ids))
    assert first.status_code == 201, first.text
    # Another caller, same key, another body: independent (neither a replay nor a mismatch).
    theirs = await http.post(
        URL, headers=keyed(alice, key), json=ds_body(release, ids[:1], reason="theirs")
    )
    assert theirs.status_code == 201, theirs.text
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["data"]["count"] == 1
    assert desired_states_issued(database_url, release, ids) == (4, 2)
    assert key_row(database_url, f"alice-{key}", key) is not None


async def test_invalid_keys_and_unauthenticated_requests(
    http: httpx.AsyncClient, operator: dict, viewer: dict, database_url: str
) -> None:
    for bad in ("", "x" * 256, "with space", "é"):
        response = await http.post(
            URL, headers={**operator, "Idempotency-Key": bad.encode()}, json={}
        )
        body = assert_error(response, 422, "VALIDATION_ERROR")
        assert body["error"]["details"][0]["field"] == "Idempotency-Key"
    # A key does not change what an unauthenticated or forbidden caller gets.
    key = str(uuid.uuid4())
    assert_error(
        await http.post(URL, headers={"Idempotency-Key": key}, json={}), 401, "UNAUTHENTICATED"
    )
    assert_error(await http.post(URL, headers=keyed(viewer, key), json={}), 403, "FORBIDDEN")
    # The longest valid key works.
    longest = "k" * 255
    ok = await http.post(URL, headers=keyed(operator, longest), json={})
    body = assert_error(ok, 422, "VALIDATION_ERROR")  # the body's fault, not the key's
    assert all(d["field"] != "Idempotency-Key" for d in body["error"]["details"])
    assert key_row(database_url, "dev-operator", longest) is None  # a 422 is not stored


async def test_the_document_states_which_keys_are_valid(
    http: httpx.AsyncClient, operator: dict, viewer: dict
) -> None:
    """The OpenAPI document gives the key's rule (schemathesis ST202 sent keys the schema
    allowed and the middleware refused): a key the pattern refuses is 422, one it allows
    is taken."""
    document = (await http.get("/openapi.json", headers=viewer)).json()
    (header,) = [
        p for p in document["paths"][URL]["post"]["parameters"] if p["name"] == "Idempotency-Key"
    ]
    pattern = re.compile(header["schema"]["pattern"])
    for bad in ("with space", "é", "tab\there", "x" * 256):
        assert not pattern.match(bad)
        response = await http.post(URL, headers={**operator, "Idempotency-Key": bad.encode()})
        assert_error(response, 422, "VALIDATION_ERROR")
    for good in ("k", "a-b_c.d~!#", "k" * 255):
        assert pattern.match(good)


async def test_telemetry_does_not_use_idempotency_keys(
    http: httpx.AsyncClient, token: Any, database_url: str, prefix: str
) -> None:
    """POST /telemetry deduplicates per event (vehicleId, eventId): a key changes nothing."""
    vehicle = f"{prefix}tele"
    insert_vehicles(database_url, [vehicle])
    device = bearer(token("device", vehicle_id=vehicle))
    key = str(uuid.uuid4())
    batch = {
        "events": [
            {
                "eventId": str(uuid.uuid4()),
                "vehicleId": vehicle,
                "seq": 1,
                "type": "desired_notified",
                "occurredAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
        ]
    }
    first = await http.post("/api/v1/telemetry", headers=keyed(device, key), json=batch)
    assert first.status_code == 202, first.text
    again = await http.post("/api/v1/telemetry", headers=keyed(device, key), json=batch)
    assert again.status_code == 202, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["data"]["duplicates"] == 1  # its own deduplication answered
    assert key_row(database_url, f"device:{vehicle}", key) is None


async def test_a_5xx_is_not_stored(
    api_settings: Settings,
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    rollout_worker: None,
) -> None:
    """A control whose workflow cannot be reached (Temporal unreachable from that replica)
    answers 503: the key is released, so the client's retry runs again instead of replaying
    the failure. (`POST /rollouts` no longer answers 503 for Temporal: the rollout stays
    pending and starts later, tests/api/test_rollout_start.py.)"""
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    key = str(uuid.uuid4())
    pause = {"reason": "investigating"}
    down = api_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with serve_app(down) as url, httpx.AsyncClient(base_url=url, timeout=30) as other:
        response = await other.post(
            f"/api/v1/rollouts/{rid}/pause", headers=keyed(operator, key), json=pause
        )
    assert_error(response, 503, "UNAVAILABLE")
    assert key_row(database_url, "dev-operator", key) is None
    retry = await http.post(
        f"/api/v1/rollouts/{rid}/pause", headers=keyed(operator, key), json=pause
    )
    assert retry.status_code == 202, retry.text
    assert "idempotent-replayed" not in retry.headers


async def test_purge_removes_expired_keys_only(
    sessions: Sessions, database_url: str, prefix: str
) -> None:
    now = datetime.now(UTC)
    rows = [
        (f"{prefix}old", now - timedelta(hours=30), now - timedelta(hours=6)),
        (f"{prefix}just-expired", now - timedelta(hours=24, seconds=1), now - timedelta(seconds=1)),
        (f"{prefix}fresh", now - timedelta(hours=23), now + timedelta(hours=1)),
        (f"{prefix}new", now, now + timedelta(hours=24)),
    ]
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO idempotency_keys (caller, key, method, path, request_hash, state,"
            " response_status, response_body, created_at, expires_at)"
            " VALUES (%s, 'k', 'POST', '/api/v1/x', 'h', 'completed', 201, '{}', %s, %s)",
            rows,
        )
    async with sessions() as session:
        deleted = await service.purge_expired(session, now=now, batch=1)
        await session.commit()
    assert deleted >= 2
    with psycopg.connect(database_url) as conn:
        left = conn.execute(
            "SELECT caller FROM idempotency_keys WHERE caller LIKE %s ORDER BY caller",
            (f"{prefix}%",),
        ).fetchall()
    assert [r[0] for r in left] == [f"{prefix}fresh", f"{prefix}new"]


async def test_an_expired_key_is_taken_over(sessions: Sessions, prefix: str) -> None:
    """Until the purge runs, an expired key counts as absent (even with another request)."""
    args = claim_args(prefix)
    async with sessions() as session:
        assert (await service.claim(session, request_hash="a", **args)).outcome == "new"
        assert (await service.claim(session, request_hash="a", **args)).outcome == "in_flight"
        assert (await service.claim(session, request_hash="b", **args)).outcome == "mismatch"

        async def backdate(assignment: str) -> None:
            await (await session.connection()).execute(
                text(f"UPDATE idempotency_keys SET {assignment} WHERE caller = :c"),
                {"c": f"{prefix}c"},
            )

        await backdate("expires_at = now() - interval '1 second'")
        assert (await service.claim(session, request_hash="b", **args)).outcome == "new"
        # An in-flight key left by a dead process is taken over by the same request only.
        await backdate("created_at = now() - interval '10 minutes'")
        assert (await service.claim(session, request_hash="a", **args)).outcome == "mismatch"
        assert (await service.claim(session, request_hash="b", **args)).outcome == "new"
        await session.rollback()


async def test_the_api_purges_expired_keys_in_the_background(
    api_settings: Settings, database_url: str, prefix: str
) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO idempotency_keys (caller, key, method, path, request_hash,"
            " created_at, expires_at) VALUES (%s, 'k', 'POST', '/api/v1/x', 'h', %s, %s)",
            [
                (f"{prefix}expired", now - timedelta(hours=25), now - timedelta(hours=1)),
                (f"{prefix}kept", now, now + timedelta(hours=24)),
            ],
        )

    def left() -> list[str]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT caller FROM idempotency_keys WHERE caller LIKE %s ORDER BY caller",
                (f"{prefix}%",),
            ).fetchall()
        return [r[0] for r in rows]

    async with serve_app(api_settings):  # its lifespan purges at start, then every interval
        for _ in range(400):  # bounded wait for the background task, not a timing assertion
            if left() == [f"{prefix}kept"]:
                break
            await asyncio.sleep(0.05)
    assert left() == [f"{prefix}kept"]


async def test_creating_a_rollout_and_controlling_it_replay_too(
    http: httpx.AsyncClient, operator: dict, database_url: str, fleet: tuple[str, list[str]]
) -> None:
    """One mechanism for every POST: a rollout is created once (one row, one workflow); a
    refused control request is not stored (a conflict saves nothing), so it is judged again."""
    release, ids = fleet
    name = f"idempotent {uuid.uuid4()}"
    body = rollout_body(release, name=name, targets={"vehicleIds": ids})
    key = str(uuid.uuid4())
    first = await http.post("/api/v1/rollouts", headers=keyed(operator, key), json=body)
    assert first.status_code == 201, first.text
    again = await http.post("/api/v1/rollouts", headers=keyed(operator, key), json=body)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    rid = first.json()["data"]["id"]
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rid,))
        created = conn.execute("SELECT count(*) FROM rollouts WHERE name = %s", (name,)).fetchone()
    assert created == (1,)

    key = str(uuid.uuid4())
    url = f"/api/v1/rollouts/{rid}/pause"
    refused = await http.post(url, headers=keyed(operator, key), json={"reason": "late"})
    assert_error(refused, 409, "INVALID_STATE_TRANSITION")
    # A refusal is not stored: judged again (and audited again), never replayed.
    again = await http.post(url, headers=keyed(operator, key), json={"reason": "late"})
    assert_error(again, 409, "INVALID_STATE_TRANSITION")
    assert "idempotent-replayed" not in again.headers
    with psycopg.connect(database_url) as conn:
        audited = conn.execute(
            "SELECT count(*) FROM audit_log WHERE target_type = 'rollout' AND target_id = %s"
            " AND action = 'rollout.pause_rejected'",
            (str(rid),),
        ).fetchone()
    assert audited == (2,)


def claim_args(prefix: str) -> dict[str, Any]:
    return {
        "caller": f"{prefix}c",
        "key": "k",
        "method": "POST",
        "path": "/api/v1/x",
        "retention": timedelta(hours=24),
        "stale_after": timedelta(seconds=120),
    }


def backdate_claim(database_url: str, caller: str) -> None:
    """The claim of `caller` looks older than any in-flight timeout (its request is slow)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '10 minutes'"
            " WHERE caller = %s",
            (caller,),
        )


async def test_a_stale_owner_cannot_release_complete_or_commit_after_a_takeover(
    sessions: Sessions, database_url: str, prefix: str
) -> None:
    """Fencing: a slow first request whose key a retry took over (new token) changes nothing:
    its release deletes nothing, its complete stores nothing, and its own transaction cannot
    commit (the execution mark it writes there matches no row)."""
    args = claim_args(prefix)
    caller = args["caller"]
    vehicle = f"{prefix}v"
    insert_vehicles(database_url, [vehicle])
    async with sessions() as session:
        first = await service.claim(session, request_hash="a", **args)
        await session.commit()
    assert first.outcome == "new" and first.token is not None
    backdate_claim(database_url, caller)
    async with sessions() as session:
        second = await service.claim(session, request_hash="a", **args)
        await session.commit()
    assert second.outcome == "new" and second.token not in (None, first.token)

    response = service.StoredResponse(status=201, headers=[], body='{"stale": true}')
    async with sessions() as session:
        assert not await service.release(session, caller=caller, key="k", token=first.token)
        assert not await service.complete(
            session, caller=caller, key="k", token=first.token, response=response
        )
        await session.commit()
    async with sessions() as session:
        assert (await service.claim(session, request_hash="a", **args)).outcome == "in_flight"
        await session.rollback()

    async def work(token: uuid.UUID, ring: str) -> None:
        async with sessions() as session:
            with idempotency_guard(IdempotencyGuard(caller=caller, key="k", token=token)) as g:
                note_created(f"/api/v1/vehicles/{vehicle}", status=201)
                await session.execute(
                    text("UPDATE vehicles SET ring = :ring WHERE id = :id"),
                    {"ring": ring, "id": vehicle},
                )
                try:
                    await session.commit()
                except BaseException:
                    await session.rollback()
                    raise
                assert g.executed

    with pytest.raises(IdempotencyKeyInUse):
        await work(first.token, "stale")
    await work(second.token, "current")
    with psycopg.connect(database_url) as conn:
        ring = conn.execute("SELECT ring FROM vehicles WHERE id = %s", (vehicle,)).fetchone()
    assert ring == ("current",)  # the stale owner's write never committed

    # The key's work committed, but its request may still be answering: a retry waits
    # (in flight), it is not told the work ran and its server stopped.
    async with sessions() as session:
        running = await service.claim(session, request_hash="a", **args)
        await session.rollback()
    assert running.outcome == "in_flight"
    # Past the in-flight timeout it is never taken over, however old (the retry answers
    # from what it created instead).
    backdate_claim(database_url, caller)
    async with sessions() as session:
        executed = await service.claim(session, request_hash="a", **args)
        await session.rollback()
    assert executed.outcome == "executed"
    assert (executed.resource, executed.status) == (f"/api/v1/vehicles/{vehicle}", 201)
    async with sessions() as session:
        assert await service.complete(
            session, caller=caller, key="k", token=second.token, response=response
        )
        await session.commit()
    async with sessions() as session:
        replay = await service.claim(session, request_hash="a", **args)
        await session.rollback()
    assert replay.outcome == "replay" and replay.response == response
