"""Who sees what: a scoped viewer, audit entries, stream tickets, bad queries."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import psycopg
import pytest

from core.auth import Principal
from models.enums import AuditSource, Role
from models.workflows import RolloutCounts
from services import audit, stream
from tests.api.conftest import bearer
from tests.api.stream import delta, feed_vehicles, open_stream
from tests.api.test_envelopes import assert_error
from tests.factories import Sessions, insert_release


async def test_scoped_viewer_sees_only_its_vehicles_rollouts_and_audit(
    client: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    sessions: Sessions,
) -> None:
    mine, other = f"{prefix}north", f"{prefix}south"
    scoped = bearer(token("viewer", scopes={"regions": [mine]}))
    release = f"{prefix}1.0.0"
    insert_release(database_url, release)
    with psycopg.connect(database_url) as conn:
        ids = {}
        for name, regions in (("in", [mine]), ("out", [mine, other])):
            row = conn.execute(
                "INSERT INTO rollouts (release_version, targets, strategy, status, created_by)"
                " VALUES (%s, %s, '{}', 'running', 'test') RETURNING id",
                (release, json.dumps({"regions": regions})),
            ).fetchone()
            assert row is not None
            ids[name] = str(row[0])

    def rollout_row(rollout_id: str) -> None:
        # As services/rollouts/status.py's snapshot, plus this test's marker.
        payload = {
            "id": int(rollout_id),
            "status": "running",
            "statusReason": None,
            "stage": None,
            "stageIndex": 0,
            "stageCount": 0,
            "waitingFor": None,
            "progress": RolloutCounts().model_dump(),
            "marker": prefix,
        }
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO change_feed (topic, event, entity_id, payload)"
                " VALUES ('rollouts', 'rollout.updated', %s, %s)",
                (rollout_id, json.dumps(payload)),
            )

    async with open_stream(client, scoped) as sse:
        feed_vehicles(database_url, [delta(f"{prefix}1", other)])  # nothing in scope: dropped
        both = feed_vehicles(database_url, [delta(f"{prefix}2", other), delta(f"{prefix}3", mine)])
        rollout_row(ids["out"])
        rollout_row(ids["in"])
        async with sessions() as session, session.begin():
            for regions in ([other], [mine]):
                await audit.record(
                    session,
                    actor=audit.Actor(f"{prefix}actor", "operator", AuditSource.API),
                    action="test.stream",
                    target_type="rollout",
                    target_id=prefix,
                    regions=regions,
                )
        got = [await sse.mine(prefix) for _ in range(3)]
    assert got[0]["event"] == "vehicle.updated" and got[0]["id"] == str(both)
    assert [d["id"] for d in got[0]["data"]["vehicles"]] == [f"{prefix}3"]
    assert got[1]["event"] == "rollout.updated"
    assert got[1]["data"]["id"] == int(ids["in"])
    assert got[2]["event"] == "audit.created"
    assert got[2]["data"]["scope"]["regions"] == [mine]
    assert got[2]["data"]["actor"] == f"{prefix}actor"


async def test_unrestricted_viewer_receives_every_audit_entry_published_by_the_writer(
    client: httpx.AsyncClient,
    viewer: dict,
    prefix: str,
    sessions: Sessions,
) -> None:
    async with open_stream(client, viewer, topics="audit") as sse:
        async with sessions() as session, session.begin():
            entry = await audit.record(
                session,
                actor=audit.Actor(f"{prefix}actor", "operator", AuditSource.API),
                action="test.stream",
                target_type="release",
                target_id=prefix,
                payload={"token": "never-sent"},
            )
        got = await sse.mine(prefix)
    assert got["event"] == "audit.created"
    assert got["data"]["id"] == entry.id
    assert got["data"]["targetId"] == prefix
    assert got["data"]["payload"] == {"token": "[REDACTED]"}


async def test_tickets(
    client: httpx.AsyncClient,
    token: Callable[..., str],
    dev_key: str,
    database_url: str,
    prefix: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    viewer = bearer(token("viewer"))
    issued = await client.post("/api/v1/stream/tickets", headers=viewer)  # no Idempotency-Key
    assert issued.status_code == 201, issued.text
    ticket = issued.json()["data"]["ticket"]
    assert issued.json()["data"]["expiresAt"]
    capfd.readouterr()
    async with open_stream(client, None, ticket=ticket, topics="vehicles") as sse:
        row_id = feed_vehicles(database_url, [delta(f"{prefix}t")])
        assert (await sse.mine(prefix))["id"] == str(row_id)
    # Reusable until it expires (the browser's reconnect).
    async with open_stream(client, None, ticket=ticket):
        pass
    logged = capfd.readouterr()
    assert "/api/v1/stream" in logged.out + logged.err  # the request lines were logged...
    assert ticket not in logged.out + logged.err  # ...without the ticket
    assert ticket.split(".")[1] not in logged.out + logged.err

    body, mac = ticket.split(".")
    tampered = f"{body}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}"
    secret = stream.ticket_secret(None, dev_key)
    expired, _ = stream.issue_ticket(
        Principal(subject="someone", role=Role.VIEWER), secret, seconds=-1
    )
    device, _ = stream.issue_ticket(
        Principal(subject="car", role=Role.DEVICE, vehicle_id="car"), secret
    )
    for bad, status, code in (
        (tampered, 401, "UNAUTHENTICATED"),
        (expired, 401, "UNAUTHENTICATED"),
        ("not-a-ticket", 401, "UNAUTHENTICATED"),
        (device, 401, "UNAUTHENTICATED"),  # only a forged ticket can name this role
    ):
        response = await client.get("/api/v1/stream", params={"ticket": bad})
        assert_error(response, status, code)
    assert_error(await client.get("/api/v1/stream"), 401, "UNAUTHENTICATED")
    assert_error(await client.post("/api/v1/stream/tickets"), 401, "UNAUTHENTICATED")
    device_token = bearer(token("device", vehicle_id=f"{prefix}car"))
    assert_error(
        await client.post("/api/v1/stream/tickets", headers=device_token), 403, "FORBIDDEN"
    )


async def test_bad_query_is_a_validation_error(client: httpx.AsyncClient, viewer: dict) -> None:
    for params, headers in (
        ({"topics": "vehicles,weather"}, {}),
        ({"lastEventId": "abc"}, {}),
        ({}, {"Last-Event-ID": "-3"}),
        # str.isdigit() accepts these, int() refuses the first (was a 500) and reads the
        # others as numbers: only ASCII digits are an event id.
        ({"lastEventId": "²"}, {}),
        ({"lastEventId": "\uff11\uff12"}, {}),  # fullwidth 12
        ({"lastEventId": "\u0663"}, {}),  # Arabic-Indic 3
        ({}, {"Last-Event-ID": "²".encode()}),
        ({"lastEventId": "-1"}, {}),
        ({"lastEventId": "9" * 19}, {}),  # more than an event id can be
        ({"lastEventId": "1e3"}, {}),
        ({"lastEventId": "5"}, {"Last-Event-ID": "x"}),  # both are checked
    ):
        response = await client.get("/api/v1/stream", params=params, headers={**viewer, **headers})
        body = assert_error(response, 422, "VALIDATION_ERROR")
        assert body["error"]["details"], body
