"""Every event of the stream matches its description in the OpenAPI document (schemathesis
ST108): under OpenAPI 3.1 the `text/event-stream` schema describes one event (`event`, `id`,
`data`), and `data` is JSON of its payload component (`contentSchema`)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.fleet import refresh_fleet_counts
from services.rollouts.status import set_rollout_status
from tests.api.conftest import bearer
from tests.api.stream import open_stream
from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import (
    Sessions,
    insert_release,
    insert_signed_release,
    insert_vehicles,
    make_rollout,
    strategy,
)
from tests.streamschema import check_event, schema_validator


def validate(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """`instance` against `schema`, whose `$ref`s point into the document's components."""
    schema_validator(document["components"], schema).validate(instance)


async def test_each_event_matches_the_openapi_description(
    client: httpx.AsyncClient,
    viewer: dict,
    token: Any,
    sessions: Sessions,
    database_url: str,
    prefix: str,
) -> None:
    document = (await client.get("/openapi.json", headers=viewer)).json()
    described = document["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]
    variants = described["text/event-stream"]["schema"]["oneOf"]
    payloads = {v["properties"]["event"]["const"]: v["properties"]["data"] for v in variants}
    assert set(payloads) == {
        "vehicle.updated",
        "rollout.updated",
        "audit.created",
        "fleet.summary",
        "resync",
    }
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM change_feed").fetchone()
    assert row is not None
    after = str(row[0])

    # Each event, written by its real writer: registration (vehicle.updated, audit.created),
    # a rollout's status (rollout.updated), a refresh of the fleet counts (fleet.summary).
    operator = bearer(token("operator"))
    vehicle = {"id": f"{prefix}1", "model": "atlas", "region": "eu-west", "ring": "broad"}
    response = await client.post("/api/v1/vehicles", headers=operator, json=vehicle)
    assert response.status_code == 201, response.text
    insert_release(database_url, f"{prefix}r")
    rollout_id = await make_rollout(
        sessions,
        release_version=f"{prefix}r",
        targets={"vehicleIds": [vehicle["id"]]},
        strategy=strategy(),
    )
    async with sessions() as session:
        await set_rollout_status(
            session, rollout_id=rollout_id, status="running", action="rollout.started"
        )
        await session.commit()
    async with sessions() as session, session.begin():
        await refresh_fleet_counts(session)

    seen: dict[str, dict[str, Any]] = {}
    async with open_stream(client, viewer, lastEventId=after) as sse:
        while set(payloads) - {"resync"} - set(seen):
            got = await sse.event()
            assert got is not None, f"the stream ended; seen {sorted(seen)}"
            seen.setdefault(got["event"], got)
    for name, got in seen.items():
        # The event as schemathesis reads it off the wire: `data` is the JSON text.
        wire = {"event": got["event"], "id": got["id"], "data": json.dumps(got["data"])}
        validate(document, {"oneOf": variants}, wire)
        validate(document, payloads[name]["contentSchema"], got["data"])


async def test_the_document_states_which_last_event_ids_and_topics_are_valid(
    client: httpx.AsyncClient, viewer: dict
) -> None:
    """lastEventId, Last-Event-ID and topics carry the rules the route applies, and are
    absent or a value, never null (schemathesis ST202 sent 32 digits, unknown topics and
    the text "null", which the schema allowed and the route refused with 422)."""
    document = (await client.get("/openapi.json", headers=viewer)).json()
    parameters = {
        p["name"]: p["schema"] for p in document["paths"]["/api/v1/stream"]["get"]["parameters"]
    }
    cases: list[tuple[str, Any, list[str], list[str]]] = [
        ("lastEventId", lambda v: {"params": {"lastEventId": v}}, ["1", " 42 ", ""], ["a"]),
        ("Last-Event-ID", lambda v: {"headers": {**viewer, "Last-Event-ID": v}}, ["1"], []),
        ("topics", lambda v: {"params": {"topics": v}}, ["audit", " vehicles ,rollouts"], []),
    ]
    for name, send, good, bad in cases:
        schema = parameters[name]
        pattern = re.compile(schema.get("pattern") or schema["items"]["pattern"])
        assert all(pattern.match(v) for v in good), name
        for value in [*bad, "0" * 19, "-1", "1.5", "vehicles,x"]:
            assert not pattern.match(value), (name, value)
            kwargs: dict[str, Any] = {"headers": viewer, **send(value)}
            response = await client.get("/api/v1/stream", **kwargs)
            assert response.status_code == 422, (name, value, response.text)


async def test_rollout_events_written_before_1_6_are_sent_in_the_current_shape(
    client: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    """The feed keeps a day of events across an upgrade: a creation row of the old shape
    (id, status, stage) and an update row with `counts` but no `progress` reach a resuming
    client with every field a `rollout.updated` now carries (the reader checks each event
    against docs/asyncapi.yaml), `progress` equal to the old `counts`."""
    counts = {"targeted": 3, "notified": 1, "updating": 0, "succeeded": 0, "failed": 0,
              "blocked": 0, "pending": 2}  # fmt: skip
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM change_feed").fetchone()
        assert row is not None
        rid = conn.execute(
            "INSERT INTO rollouts (release_version, targets, strategy, status, created_by)"
            " VALUES (%s, '{\"vehicleIds\": [\"none\"]}', '{}', 'completed', 'test')"
            " RETURNING id",
            (f"{prefix}r",),
        ).fetchone()
        assert rid is not None
        for payload in (
            {"id": rid[0], "status": "pending", "stage": None},
            {"id": rid[0], "status": "running", "stage": "canary", "stageIndex": 0,
             "stageCount": 2, "statusReason": None, "waitingFor": "bake", "counts": counts},
        ):  # fmt: skip
            conn.execute(
                "INSERT INTO change_feed (topic, event, entity_id, payload)"
                " VALUES ('rollouts', 'rollout.updated', %s, %s)",
                (str(rid[0]), json.dumps(payload)),
            )
    async with open_stream(client, viewer, topics="rollouts", lastEventId=str(row[0])) as sse:
        created = await sse.mine(f'"id": {rid[0]},')
        updated = await sse.mine(f'"id": {rid[0]},')
    assert created["data"]["progress"] == {name: 0 for name in counts}
    assert created["data"]["stageIndex"] == 0 and created["data"]["waitingFor"] is None
    assert updated["data"]["progress"] == updated["data"]["counts"] == counts


async def test_the_event_at_creation_carries_the_whole_snapshot(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """`POST /rollouts` writes its `rollout.updated` through the same snapshot as every later
    change: all the fields, `progress` included (it used to carry id, status and stage)."""
    release = f"{prefix}2026.12.1"
    insert_signed_release(database_url, signing_key, release)
    insert_vehicles(database_url, [f"{prefix}v{i}" for i in range(3)])
    body = rollout_body(release, targets={"vehicleIds": [f"{prefix}v{i}" for i in range(3)]})
    created = await http.post("/api/v1/rollouts", headers=operator, json=body)
    assert created.status_code == 201, created.text
    rid = created.json()["data"]["id"]
    try:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT id, payload FROM change_feed WHERE topic = 'rollouts' AND entity_id = %s"
                " ORDER BY id LIMIT 1",
                (str(rid),),
            ).fetchall()
        (feed_id, payload), *_ = rows
        check_event({"event": "rollout.updated", "id": str(feed_id), "data": payload})
        assert payload["progress"] == created.json()["data"]["progress"]
    finally:
        with psycopg.connect(database_url) as conn:  # hold no vehicle for later tests
            conn.execute("UPDATE rollouts SET status = 'aborted' WHERE id = %s", (rid,))
