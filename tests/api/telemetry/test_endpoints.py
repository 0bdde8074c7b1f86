"""The telemetry endpoints' contract on the real app over real PostgreSQL: POST /telemetry's
validation (a bad item refuses the whole batch), device ownership, size limits and overload;
the device's desired state (ETag, 304) and the timeline (keyset pages)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from core.settings import Settings
from tests.api.conftest import HOLD_INGEST_WRITER, bearer, serve_app
from tests.api.telemetry import URL, event, event_count, heartbeat, set_desired, vehicle_row
from tests.factories import insert_vehicles

JSON = {"Content-Type": "application/json"}


async def test_device_posts_only_for_its_own_vehicle(
    http: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    mine, other = f"{prefix}0", f"{prefix}1"
    insert_vehicles(database_url, [mine, other], release="1.0")
    device = bearer(token("device", vehicle_id=mine))
    ok = await http.post(URL, json={"events": [event(mine, 1, "apply_start")]}, headers=device)
    assert ok.status_code == 202
    body = {"events": [event(mine, 2, "apply_start"), event(other, 1, "apply_start")]}
    refused = await http.post(URL, json=body, headers=device)
    assert refused.status_code == 403
    err = refused.json()["error"]
    assert err["code"] == "FORBIDDEN"
    assert err["details"][0]["field"] == "events.1.vehicleId" and err["details"][0]["index"] == 1
    assert event_count(database_url, prefix) == 1  # nothing of the refused batch
    viewer_token = bearer(token("viewer"))
    assert (await http.post(URL, json=body, headers=viewer_token)).status_code == 403


async def test_one_bad_item_rejects_the_whole_batch(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    good = [event(vid, s, "apply_start") for s in (1, 2, 3)]
    cases = [
        ({**good[2], "reasonCode": "not-upper"}, "events.2.reasonCode"),
        ({**good[2], "type": "exploded"}, "events.2.type"),
        ({**good[2], "seq": "3"}, "events.2.seq"),
        ({**good[2], "eventId": "nope"}, "events.2.eventId"),
        ({**good[2], "surprise": 1}, "events.2.surprise"),
        ({**good[2], "type": "failed"}, "events.2"),  # failed needs a reasonCode
        ({**good[2], "occurredAt": "2026-11-28T10:00:00"}, "events.2.occurredAt"),  # no zone
        # NUL (U+0000), which PostgreSQL cannot store, anywhere a string goes
        ({**good[2], "details": {"note": "a\u0000b"}}, "events.2.details.note"),
        ({**good[2], "details": {"k\u0000": [1, {"x": "y"}]}}, "events.2.details"),  # a key
        ({**good[2], "details": {"deep": [{"x": "\u0000"}]}}, "events.2.details.deep.0.x"),
        ({**good[2], "releaseVersion": "1.\u00002"}, "events.2.releaseVersion"),
        ({**good[2], "vehicleId": vid + "\u0000"}, "events.2.vehicleId"),
    ]
    for bad, field in cases:
        r = await http.post(URL, json={"events": [*good[:2], bad]}, headers=gateway)
        assert r.status_code == 422, (field, r.text)
        err = r.json()["error"]
        assert err["code"] == "VALIDATION_ERROR"
        assert err["details"][0]["field"] == field and err["details"][0]["index"] == 2
    bad_hb = {**heartbeat(vid), "batteryPercent": 140}
    r = await http.post(URL, json={"heartbeats": [bad_hb], "events": good}, headers=gateway)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "heartbeats.0.batteryPercent"
    # An unknown vehicle refuses the batch too.
    r = await http.post(
        URL, json={"events": [*good, event(f"{prefix}ghost", 1, "ready")]}, headers=gateway
    )
    assert r.status_code == 404
    assert r.json()["error"]["details"][0]["field"] == "events.3.vehicleId"
    assert event_count(database_url, prefix) == 0
    assert vehicle_row(database_url, vid)["last_event_seq"] == 0


def raw_json(body: dict[str, Any]) -> bytes:
    """The body as a device could send it but httpx's `json=` never would: lone surrogates as
    `\\ud800` escapes, NaN and Infinity as bare words."""
    return json.dumps(body).encode()


async def test_what_postgresql_cannot_store_is_refused_naming_the_field(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """Every string of a batch, every number of `details` and every timestamp PostgreSQL
    would refuse (or store but never read back) is a 422 naming the field, before any group:
    a lone surrogate (JSON `\\ud800`, which the JSON parser refused as the whole body, field
    `body`), NaN, Infinity and floats beyond ±1.8e308 in `details` (jsonb refused them inside
    the group: a 500), a timestamp outside years 1-9999 in UTC (stored, then unreadable)."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    good = [event(vid, s, "apply_start") for s in (1, 2, 3, 4)]
    lone = "\ud800"
    cases = [
        ({**good[3], "vehicleId": vid + lone}, "events.3.vehicleId"),
        ({**good[3], "eventId": lone}, "events.3.eventId"),
        ({**good[3], "releaseVersion": "1." + lone}, "events.3.releaseVersion"),
        ({**good[3], "type": "failed", "reasonCode": "X" + lone}, "events.3.reasonCode"),
        ({**good[3], "desiredStateId": lone}, "events.3.desiredStateId"),
        ({**good[3], "details": {"a": {"b": "x\udc00y"}}}, "events.3.details.a.b"),
        ({**good[3], "details": {"a": [1, {"k" + lone: 1}]}}, "events.3.details.a.1"),
        ({**good[3], "details": {"a": {"b": float("nan")}}}, "events.3.details.a.b"),
        ({**good[3], "details": {"a": [float("inf")]}}, "events.3.details.a.0"),
        ({**good[3], "details": {"a": -float("inf")}}, "events.3.details.a"),
        ({**good[3], "occurredAt": "0001-01-01T00:30:00+01:00"}, "events.3.occurredAt"),
        ({**good[3], "occurredAt": "9999-12-31T23:30:00-01:00"}, "events.3.occurredAt"),
        ({**good[3], "seq": 2**63}, "events.3.seq"),  # past bigint (bounded before issue 19)
    ]
    for bad, field in cases:
        body = raw_json({"events": [*good[:3], bad]})
        r = await http.post(URL, content=body, headers={**gateway, **JSON})
        assert r.status_code == 422, (field, r.text)
        err = r.json()["error"]
        assert err["code"] == "VALIDATION_ERROR", (field, err)
        assert err["details"][0]["field"] == field and err["details"][0]["index"] == 3, err
    # Only the `details` fragment is rewritten: the timestamp may hold "1.0" too (":41.0…").
    overflow = raw_json({"events": [{**good[3], "details": {"a": {"b": 1.0}}}]})
    fragment = b'{"a": {"b": 1.0}}'
    assert overflow.count(fragment) == 1
    r = await http.post(
        URL,
        content=overflow.replace(fragment, b'{"a": {"b": 1e400}}'),
        headers={**gateway, **JSON},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["field"] == "events.0.details.a.b"
    for hb, field in [
        ({**heartbeat(vid), "actualReleaseVersion": lone}, "heartbeats.1.actualReleaseVersion"),
        ({**heartbeat(vid), "sentAt": "0001-01-01T00:00:00+00:01"}, "heartbeats.1.sentAt"),
        ({**heartbeat(vid), "batteryPercent": 2**15}, "heartbeats.1.batteryPercent"),  # smallint
    ]:
        body = raw_json({"heartbeats": [heartbeat(vid), hb]})
        r = await http.post(URL, content=body, headers={**gateway, **JSON})
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["details"][0]["field"] == field
    assert event_count(database_url, prefix) == 0
    assert vehicle_row(database_url, vid)["last_event_seq"] == 0
    # What stays storable is taken: integers of any size JSON carries, the year 1 and 9999
    # edges in UTC, a surrogate pair (one character, not a lone half).
    fine = {
        **good[0],
        "occurredAt": "0001-01-01T00:30:00-01:00",
        "details": {"big": 10**40, "tiny": 1e-400, "pair": "\U0001f697"},
    }
    r = await http.post(URL, content=raw_json({"events": [fine]}), headers={**gateway, **JSON})
    assert r.status_code == 202, r.text
    assert event_count(database_url, prefix) == 1


async def test_size_limits_are_413(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    many = {"events": [event(vid, s, "apply_start") for s in range(1, 1002)]}
    r = await http.post(URL, json=many, headers=gateway)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    huge = b'{"events": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    r = await http.post(URL, content=huge, headers={**gateway, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert event_count(database_url, prefix) == 0


async def test_desired_state_etag_and_304(
    http: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    vid, other = f"{prefix}0", f"{prefix}1"
    insert_vehicles(database_url, [vid, other], release="1.0")
    device = bearer(token("device", vehicle_id=vid))
    url = f"/api/v1/vehicles/{vid}/desired-state"
    first = await http.get(url, headers=device)
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert first.json()["data"]["releaseVersion"] == "1.0"
    again = await http.get(url, headers={**device, "If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag
    ds = set_desired(database_url, vid, "2.0")
    changed = await http.get(url, headers={**device, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["data"]["desiredStateId"] == ds
    assert (
        await http.get(f"/api/v1/vehicles/{other}/desired-state", headers=device)
    ).status_code == 403
    viewer = bearer(token("viewer"))
    assert (await http.get(url, headers=viewer)).status_code == 403


async def test_timeline_keyset_newest_first(
    http: httpx.AsyncClient, gateway: dict, viewer: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    r = await http.post(
        URL,
        json={"events": [event(vid, s, "apply_start", details={"n": s}) for s in range(1, 13)]},
        headers=gateway,
    )
    assert r.status_code == 202
    seqs: list[int] = []
    cursor = None
    while True:
        q = f"/api/v1/vehicles/{vid}/timeline?limit=5" + (f"&cursor={cursor}" if cursor else "")
        body = (await http.get(q, headers=viewer)).json()
        seqs += [e["seq"] for e in body["data"]]
        assert all(e["details"] == {"n": e["seq"]} for e in body["data"])
        cursor = body["metadata"]["nextCursor"]
        if not cursor:
            break
    assert seqs == list(range(12, 0, -1))
    missing = await http.get(f"/api/v1/vehicles/{prefix}none/timeline", headers=viewer)
    assert missing.status_code == 404


@pytest.fixture
async def tiny_queue_api(api_settings: Settings) -> Any:
    """A second app whose ingest queue holds 600 items."""
    settings = api_settings.model_copy(update={"ingest_queue_max_items": 600, "ingest_writers": 1})
    async with serve_app(settings) as url:
        yield url


async def test_overload_is_503_with_retry_after(
    tiny_queue_api: str, gateway: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    first = {"events": [event(vid, s, "apply_start") for s in range(1, 501)]}
    second = {"events": [event(vid, s, "apply_start") for s in range(501, 1001)]}
    blocker = await psycopg.AsyncConnection.connect(database_url)
    async with httpx.AsyncClient(base_url=tiny_queue_api, timeout=30) as client:
        # Hold the writer: the first batch waits on a lock while it is being written.
        await blocker.execute(HOLD_INGEST_WRITER)
        pending = asyncio.create_task(client.post(URL, json=first, headers=gateway))
        await asyncio.sleep(0.5)
        refused = await client.post(URL, json=second, headers=gateway)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "OVERLOADED"
        assert int(refused.headers["retry-after"]) >= 1
        await blocker.rollback()
        await blocker.close()
        accepted = await pending
        assert accepted.status_code == 202 and accepted.json()["data"]["accepted"] == 500
        # Once the queue drains, the refused batch is taken.
        retried = await client.post(URL, json=second, headers=gateway)
        assert retried.status_code == 202 and retried.json()["data"]["accepted"] == 500
    assert event_count(database_url, prefix) == 1000


async def test_a_nul_in_one_request_fails_no_other_request(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """U+0000 inside a group commit failed the whole group (issue 19): 1 bad request among
    30 good ones sent together gave many of the good ones a 500. It is refused alone now."""
    vids = [f"{prefix}{i}" for i in range(30)]
    insert_vehicles(database_url, vids, release="1.0")
    good = [{"events": [event(vid, 1, "apply_start")]} for vid in vids]
    bad = {"events": [event(vids[0], 2, "apply_start", details={"note": "\u0000"})]}
    answers = await asyncio.gather(
        *(http.post(URL, json=body, headers=gateway) for body in [*good[:15], bad, *good[15:]])
    )
    codes = [r.status_code for r in answers]
    assert codes[15] == 422, answers[15].text
    assert codes[:15] + codes[16:] == [202] * 30
    assert answers[15].json()["error"]["details"][0]["field"] == "events.0.details.note"
    assert event_count(database_url, prefix) == 30


async def test_an_empty_body_is_an_empty_batch_as_documented(
    http: httpx.AsyncClient, gateway: dict[str, str], viewer: dict[str, str]
) -> None:
    """A POST without a body is an empty batch (202, nothing accepted), and the OpenAPI
    document says the body is optional (schemathesis ST201 when it said required)."""
    response = await http.post(URL, headers=gateway)
    assert response.status_code == 202, response.text
    assert response.json()["data"] == {"accepted": 0, "duplicates": 0, "heartbeats": 0}
    document = (await http.get("/openapi.json", headers=viewer)).json()
    assert document["paths"][URL]["post"]["requestBody"]["required"] is False
