"""POST /telemetry, the devices' desired state and the timeline, on the real app over real
PostgreSQL: deduplication, ordering, stale desired states, device ownership, whole-batch
rejection, size limits, overload, rollout outcomes and status consistency."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from core.settings import Settings
from services.telemetry import recompute_statuses
from tests.api.conftest import HOLD_INGEST_WRITER, bearer, insert_vehicles, serve_app

URL = "/api/v1/telemetry"


def now_iso(offset: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")


def event(vid: str, seq: int, kind: str, ds: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "eventId": str(uuid.uuid4()),
        "vehicleId": vid,
        "seq": seq,
        "type": kind,
        "occurredAt": now_iso(),
        "desiredStateId": ds,
        "releaseVersion": kw.pop("release", None),
        "reasonCode": kw.pop("reason", None),
        "details": kw.pop("details", {}),
    }
    return body


def heartbeat(vid: str, **kw: Any) -> dict[str, Any]:
    return {
        "vehicleId": vid,
        "sentAt": kw.pop("sent_at", now_iso()),
        "batteryPercent": kw.pop("battery", 80),
        "stationary": kw.pop("stationary", True),
        "actualReleaseVersion": kw.pop("actual", "1.0"),
    }


@pytest.fixture(scope="session")
def gateway(token: Callable[..., str]) -> dict[str, str]:
    return bearer(token("gateway"))


def set_desired(database_url: str, vid: str, release: str = "2.0") -> str:
    """Give the vehicle a desired state (as the rollout path would) and return its id."""
    ds = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO desired_states (id, vehicle_id, release_version, created_by)"
            " VALUES (%s, %s, %s, 'test')",
            (ds, vid, release),
        )
        conn.execute(
            "UPDATE vehicles SET desired_release_version = %s, desired_state_id = %s,"
            " status = 'pending', actual_release_version = '1.0' WHERE id = %s",
            (release, ds, vid),
        )
    return ds


def vehicle_row(database_url: str, vid: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as c:
        row = c.execute("SELECT * FROM vehicles WHERE id = %s", (vid,)).fetchone()
    assert row is not None
    return row


def event_count(database_url: str, prefix: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM timeline_events WHERE vehicle_id LIKE %s", (prefix + "%",)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_duplicates_same_batch_twice_adds_nothing(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{i}" for i in range(3)]
    insert_vehicles(database_url, ids, release="1.0")
    body = {
        "heartbeats": [heartbeat(v) for v in ids],
        "events": [event(v, s, "apply_start") for v in ids for s in (1, 2)],
    }
    first = await http.post(URL, json=body, headers=gateway)
    assert first.status_code == 202, first.text
    assert first.json()["data"] == {"accepted": 6, "duplicates": 0, "heartbeats": 3}
    again = await http.post(URL, json=body, headers=gateway)
    assert again.status_code == 202
    assert again.json()["data"]["accepted"] == 0 and again.json()["data"]["duplicates"] == 6
    assert event_count(database_url, prefix) == 6
    # The same event twice inside one batch counts once.
    dup = event(ids[0], 9, "apply_start")
    both = await http.post(URL, json={"events": [dup, dup]}, headers=gateway)
    assert both.json()["data"] == {"accepted": 1, "duplicates": 1, "heartbeats": 0}


async def test_an_event_id_sent_again_under_a_new_seq_is_a_duplicate(
    http: httpx.AsyncClient, gateway: dict, viewer: dict, database_url: str, prefix: str
) -> None:
    """A batch whose events all look newer than what is stored goes in without `ON CONFLICT`
    (services/telemetry.py `_insert_new_events`); an event id reused under a higher seq is a
    duplicate all the same: the batch is rolled back to its savepoint and inserted again,
    the new events accepted, the old event kept as it was, nothing lost."""
    vid, other = f"{prefix}0", f"{prefix}1"
    insert_vehicles(database_url, [vid, other], release="1.0")
    ds = set_desired(database_url, vid)
    first = event(vid, 1, "desired_notified", ds)
    r = await http.post(URL, json={"events": [first]}, headers=gateway)
    assert r.json()["data"] == {"accepted": 1, "duplicates": 0, "heartbeats": 0}
    reused = {**first, "seq": 5, "type": "failed", "reasonCode": "DISK_FULL"}
    fresh = [event(vid, 6, "apply_start", ds), event(other, 1, "apply_start")]
    r = await http.post(URL, json={"events": [reused, *fresh]}, headers=gateway)
    assert r.status_code == 202, r.text
    assert r.json()["data"] == {"accepted": 2, "duplicates": 1, "heartbeats": 0}
    tl = (await http.get(f"/api/v1/vehicles/{vid}/timeline", headers=viewer)).json()
    assert [(e["seq"], e["type"]) for e in tl["data"]] == [
        (6, "apply_start"),
        (1, "desired_notified"),
    ]
    assert event_count(database_url, prefix) == 3
    row = vehicle_row(database_url, vid)
    assert (row["last_event_seq"], row["status"]) == (6, "updating")


async def test_a_vehicle_both_derived_and_refreshed_in_one_group_is_written_once(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """A vehicle flagged for derivation (its narrow row's actual release differs from the wide
    row's) whose heartbeat also changes something visible: the wide update finds the row by
    the address the lock read, so the heartbeat refresh must leave that row to it."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    r = await http.post(URL, json={"heartbeats": [heartbeat(vid)]}, headers=gateway)
    assert r.status_code == 202, r.text
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE vehicle_telemetry SET actual_release_version = NULL WHERE vehicle_id = %s",
            (vid,),
        )
        conn.execute("UPDATE vehicles SET stationary = false WHERE id = %s", (vid,))
    older = heartbeat(vid, sent_at=now_iso(-60), actual=None)
    r = await http.post(URL, json={"heartbeats": [older]}, headers=gateway)
    assert r.status_code == 202, r.text
    row = vehicle_row(database_url, vid)
    assert row["stationary"] is True and row["status"] == "in_sync"


async def test_out_of_order_events_never_move_status_backwards(
    http: httpx.AsyncClient, gateway: dict, viewer: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid)
    r = await http.post(URL, json={"events": [event(vid, 3, "ready", ds)]}, headers=gateway)
    assert r.status_code == 202
    assert vehicle_row(database_url, vid)["status"] == "in_sync"
    late = [event(vid, 1, "desired_notified", ds), event(vid, 2, "apply_start", ds)]
    r = await http.post(URL, json={"events": late}, headers=gateway)
    assert r.json()["data"]["accepted"] == 2
    row = vehicle_row(database_url, vid)
    assert row["status"] == "in_sync" and row["last_event_seq"] == 3
    # The late events are in the timeline, in their place.
    tl = (await http.get(f"/api/v1/vehicles/{vid}/timeline", headers=viewer)).json()
    assert [e["seq"] for e in tl["data"]] == [3, 2, 1]
    assert [e["type"] for e in tl["data"]] == ["ready", "apply_start", "desired_notified"]


async def test_status_follows_events_and_heartbeats(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid)
    assert vehicle_row(database_url, vid)["status"] == "pending"
    steps = [
        (event(vid, 1, "desired_notified", ds), "updating", []),
        (event(vid, 2, "blocked", ds, reason="BATTERY_LOW"), "blocked", ["BATTERY_LOW"]),
        (event(vid, 3, "apply_start", ds), "updating", []),
        (event(vid, 4, "failed", ds, reason="FLUX_CAPACITOR"), "failed", ["FLUX_CAPACITOR"]),
    ]
    for ev, status, codes in steps:
        r = await http.post(URL, json={"events": [ev]}, headers=gateway)
        assert r.status_code == 202, r.text
        row = vehicle_row(database_url, vid)
        assert (row["status"], row["reason_codes"]) == (status, codes)
    # The heartbeat that reports the desired release: in sync.
    r = await http.post(URL, json={"heartbeats": [heartbeat(vid, actual="2.0")]}, headers=gateway)
    assert r.status_code == 202
    row = vehicle_row(database_url, vid)
    assert (row["status"], row["actual_release_version"]) == ("in_sync", "2.0")


def feed_deltas(database_url: str, prefix: str) -> list[list[dict[str, Any]]]:
    """The `vehicle.updated` change-feed rows naming these test vehicles, oldest first, each
    as its list of vehicle deltas."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT payload->'vehicles' FROM change_feed f WHERE event = 'vehicle.updated'"
            " AND EXISTS (SELECT 1 FROM jsonb_array_elements(f.payload->'vehicles') d"
            "             WHERE d->>'id' LIKE %s)"
            " ORDER BY id",
            (prefix + "%",),
        ).fetchall()
    return [r[0] for r in rows]


async def test_status_changes_reach_the_change_feed_as_one_batched_row(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """One request moving three statuses adds one `vehicle.updated` row carrying the three
    deltas (with each vehicle's scope, for the stream's filtering); an event that moves no
    status adds nothing."""
    ids = [f"{prefix}{i}" for i in range(3)]
    insert_vehicles(database_url, ids, release="1.0")
    desired = {v: set_desired(database_url, v) for v in ids}
    with psycopg.connect(database_url) as conn:
        places = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, region, model, org FROM vehicles WHERE id = ANY(%s)", (ids,)
            )
        }
    body = {"events": [event(v, 1, "desired_notified", desired[v]) for v in ids]}
    assert (await http.post(URL, json=body, headers=gateway)).status_code == 202
    rows = feed_deltas(database_url, prefix)
    assert len(rows) == 1
    assert sorted(
        (d["id"], d["status"], d["reasonCodes"], (d["region"], d["model"], d["org"]))
        for d in rows[0]
    ) == sorted((v, "updating", [], places[v]) for v in ids)
    # apply_start leaves them updating: a new latest event, but no change to publish.
    body = {"events": [event(v, 2, "apply_start", desired[v]) for v in ids]}
    assert (await http.post(URL, json=body, headers=gateway)).status_code == 202
    assert len(feed_deltas(database_url, prefix)) == 1
    body = {"events": [event(ids[0], 3, "failed", desired[ids[0]], reason="APPLY_FAILED")]}
    assert (await http.post(URL, json=body, headers=gateway)).status_code == 202
    rows = feed_deltas(database_url, prefix)
    assert len(rows) == 2
    assert [(d["id"], d["status"], d["reasonCodes"]) for d in rows[1]] == [
        (ids[0], "failed", ["APPLY_FAILED"])
    ]


async def test_events_for_a_stale_desired_state(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    old = set_desired(database_url, vid, "1.5")
    set_desired(database_url, vid, "2.0")
    r = await http.post(URL, json={"events": [event(vid, 1, "ready", old)]}, headers=gateway)
    assert r.json()["data"]["accepted"] == 1  # it enters the timeline
    assert vehicle_row(database_url, vid)["status"] == "pending"  # but says nothing of 2.0


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


async def test_events_feed_rollout_outcomes(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{i}" for i in range(4)]
    insert_vehicles(database_url, ids, release="1.0")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO releases (version, components, artifact_digest, signature,"
            " signing_key_id, created_by) VALUES ('9.9', '[]', 'sha256:00', 'c2ln', 'k', 't')"
            " ON CONFLICT DO NOTHING"
        )
        # Its targets name only this test's vehicles (an active rollout's targets take
        # part in other tests' overlap checks).
        rid = conn.execute(
            "INSERT INTO rollouts (release_version, created_by, status, targeted, notified,"
            " targets) VALUES ('9.9', 'test', 'running', 4, 4, %s) RETURNING id",
            (json.dumps({"vehicleIds": ids}),),
        ).fetchone()[0]  # type: ignore[index]
    dss = {}
    for v in ids:
        dss[v] = set_desired(database_url, v, "9.9")
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE vehicles SET rollout_id = %s WHERE id = %s", (rid, v))
            conn.execute(
                "INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state,"
                " desired_state_id) VALUES (%s, %s, 0, 0, 'notified', %s)",
                (rid, v, dss[v]),
            )
    a, b, c, d = ids
    events = [
        event(a, 1, "apply_start", dss[a]),
        event(b, 2, "ready", dss[b]),
        event(c, 1, "failed", dss[c], reason="APPLY_FAILED"),
        event(d, 1, "ready", str(uuid.uuid4())),  # another desired state: not a success
    ]
    r = await http.post(URL, json={"events": events}, headers=gateway)
    assert r.status_code == 202
    with psycopg.connect(database_url) as conn:
        states: dict[str, str] = dict(
            conn.execute(
                "SELECT vehicle_id, state || coalesce(':' || reason_code, '')"
                " FROM rollout_targets WHERE rollout_id = %s",
                (rid,),
            ).fetchall()
        )
        counters = conn.execute(
            "SELECT updating, succeeded, failed, blocked FROM rollouts WHERE id = %s", (rid,)
        ).fetchone()
    assert states == {a: "updating", b: "succeeded", c: "failed:APPLY_FAILED", d: "notified"}
    assert counters == (1, 1, 1, 0)
    # A late event about the same desired state does not undo the success.
    late = {"events": [event(b, 1, "apply_start", dss[b])]}
    assert (await http.post(URL, json=late, headers=gateway)).status_code == 202
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT state FROM rollout_targets WHERE rollout_id = %s AND vehicle_id = %s",
            (rid, b),
        ).fetchone() == ("succeeded",)
        conn.execute("UPDATE rollouts SET status = 'aborted' WHERE id = %s", (rid,))


async def test_stored_status_matches_a_recomputation(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str, sessions: Any
) -> None:
    """Many vehicles, events in every order and heartbeats: the stored status equals the
    status recomputed from scratch (desired state, latest event, latest heartbeat)."""
    ids = [f"{prefix}{i:03d}" for i in range(60)]
    insert_vehicles(database_url, ids, release="1.0")
    dss = {v: set_desired(database_url, v, "2.0") for v in ids[:50]}
    kinds = ["desired_notified", "apply_start", "ready", "failed", "blocked"]
    batches: list[list[dict[str, Any]]] = [[], [], []]
    for n, v in enumerate(ids):
        ds = dss.get(v)
        for seq in range(1, 1 + n % 5 + 1):
            kind = kinds[(n + seq) % 5]
            reason = {"failed": "APPLY_FAILED", "blocked": "NOT_STATIONARY"}.get(kind)
            batches[(n * seq) % 3].append(event(v, seq, kind, ds, reason=reason))
    hbs = [heartbeat(v, actual="2.0" if i % 7 == 0 else "1.0") for i, v in enumerate(ids)]
    results = await asyncio.gather(
        *(http.post(URL, json={"events": b}, headers=gateway) for b in batches),
        http.post(URL, json={"heartbeats": hbs}, headers=gateway),
    )
    assert all(r.status_code == 202 for r in results)
    async with sessions() as session:
        mismatches = await recompute_statuses(session, vehicle_ids=ids, offline_after_seconds=300)
    assert mismatches == []


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


async def test_heartbeats_coalesce_and_the_wide_row_lags_only_on_last_seen(
    http: httpx.AsyncClient,
    gateway: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    """Latest heartbeat per vehicle wins; a heartbeat that changes nothing visible refreshes
    only the narrow row, and GET /vehicles/{id} and the offline marking read the fresh one."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    start = vehicle_row(database_url, vid)["last_seen_at"]
    first = heartbeat(vid, sent_at=(start + timedelta(seconds=5)).isoformat(), battery=80)
    assert (await http.post(URL, json={"heartbeats": [first]}, headers=gateway)).status_code == 202
    base = vehicle_row(database_url, vid)["last_seen_at"]  # battery was unknown: written
    assert base == start + timedelta(seconds=5)
    newer = (base + timedelta(seconds=20)).isoformat()
    older = (base + timedelta(seconds=10)).isoformat()
    body = {
        "heartbeats": [
            heartbeat(vid, sent_at=newer, battery=81),
            heartbeat(vid, sent_at=older, battery=20),  # older: loses
        ]
    }
    r = await http.post(URL, json=body, headers=gateway)
    assert r.status_code == 202
    wide = vehicle_row(database_url, vid)
    assert wide["last_seen_at"] == base  # nothing visible changed: the wide row is untouched
    with psycopg.connect(database_url) as conn:
        narrow = conn.execute(
            "SELECT last_seen_at, battery_percent FROM vehicle_telemetry WHERE vehicle_id = %s",
            (vid,),
        ).fetchone()
    assert narrow == (base + timedelta(seconds=20), 81)
    one = (await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)).json()["data"]
    assert one["batteryPercent"] == 81
    assert datetime.fromisoformat(one["lastSeenAt"].replace("Z", "+00:00")) == narrow[0]
    # A visible change (stationary flips) is written to the wide row at once.
    later = (base + timedelta(seconds=30)).isoformat()
    r = await http.post(
        URL, json={"heartbeats": [heartbeat(vid, sent_at=later, stationary=False)]}, headers=gateway
    )
    wide = vehicle_row(database_url, vid)
    assert wide["stationary"] is False and wide["last_seen_at"] == base + timedelta(seconds=30)
    # The offline marking trusts the narrow row: a cutoff between the two keeps it online.
    from services.reconcile import mark_offline

    async with sessions() as session:
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "UPDATE vehicle_telemetry SET last_seen_at = %s WHERE vehicle_id = %s",
                (base + timedelta(seconds=100), vid),
            )
        await mark_offline(session, cutoff=base + timedelta(seconds=60))
        await session.commit()
    assert vehicle_row(database_url, vid)["status"] != "offline"


@pytest.mark.parametrize("first_group_on_connection", [True, False])
async def test_a_group_refuses_only_its_bad_requests(
    database_url: str, prefix: str, sessions: Any, first_group_on_connection: bool
) -> None:
    """One group (as the committer merges concurrent requests): a request naming an unknown
    vehicle and one outside its caller's scope are refused whole; the others are written,
    whether the group was written optimistically (unrestricted callers: the shortfall is
    found by the upsert and the group redone) or checked first (a scoped caller)."""
    from models.scope import Scope
    from models.telemetry import TelemetryBatch
    from services.telemetry import GroupRequest, WideWritePolicy, write_group

    good, other = f"{prefix}good", f"{prefix}north"
    insert_vehicles(database_url, [good], release="1.0")
    insert_vehicles(database_url, [other], release="1.0", region="eu-north")

    def request(scope: Scope, *items: dict[str, Any]) -> GroupRequest:
        return GroupRequest(
            batch=TelemetryBatch.model_validate_json(json.dumps({"events": items})), scope=scope
        )

    for scoped in (False, True):
        ok = request(Scope(), event(good, 1 + 2 * scoped, "apply_start"))
        ghost = request(
            Scope(), event(good, 2 + 2 * scoped, "ready"), event(f"{prefix}x", 1, "ready")
        )
        outside = request(
            Scope(regions=("eu-west",)) if scoped else Scope(), event(other, 1 + scoped, "ready")
        )
        group = [ok, ghost, outside]
        async with sessions() as session:
            if not first_group_on_connection:
                await write_group(session, requests=[], policy=WideWritePolicy())
            result = await write_group(session, requests=group, policy=WideWritePolicy())
            await session.commit()
        assert ok.refused is None and ok.accepted == 1
        assert ghost.refused is not None and ghost.refused[0]["field"] == "events.1.vehicleId"
        assert ghost.accepted == 0
        if scoped:
            assert outside.refused is not None and outside.accepted == 0
        else:
            assert outside.refused is None and outside.accepted == 1
        assert result.refused_requests == 1 + scoped
    # Stored: the good vehicle's two accepted events and the other's first, nothing else.
    assert event_count(database_url, prefix) == 3
    assert vehicle_row(database_url, good)["last_event_seq"] == 3
