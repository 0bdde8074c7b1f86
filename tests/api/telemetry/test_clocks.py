"""Device clocks and counters decide neither liveness nor order beyond what the server allows
(services/telemetry/clock.py, docs/telemetry.md "Clocks and counters"): through POST
/telemetry on the real app over real PostgreSQL, and through `write_group` itself. After each
case the stored statuses agree with `recompute_statuses`, the consistency check."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from models.scope import Scope
from models.telemetry import TelemetryBatch
from services.telemetry import GroupRequest, WideWritePolicy, recompute_statuses, write_group
from tests.api.conftest import all_pages
from tests.api.telemetry import URL, event, event_count, heartbeat, set_desired, vehicle_row
from tests.factories import insert_vehicles

FAR_FUTURE = "2099-01-01T00:00:00Z"


def narrow_row(database_url: str, vid: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as c:
        return c.execute("SELECT * FROM vehicle_telemetry WHERE vehicle_id = %s", (vid,)).fetchone()


async def consistent(sessions: Any, ids: list[str]) -> None:
    async with sessions() as session:
        mismatches = await recompute_statuses(session, vehicle_ids=ids, offline_after_seconds=300)
    assert mismatches == []


async def test_a_time_in_2099_is_refused_whole_and_stores_nothing(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """A heartbeat dated 2099 (or an event) is 422 naming the field; nothing of its batch
    is stored, so it can freeze nothing."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    body = {
        "heartbeats": [heartbeat(vid, battery=55), heartbeat(vid, sent_at=FAR_FUTURE, battery=1)],
        "events": [event(vid, 1, "apply_start")],
    }
    r = await http.post(URL, json=body, headers=gateway)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["heartbeats.1.sentAt"]
    late = {"events": [{**event(vid, 1, "apply_start"), "occurredAt": FAR_FUTURE}]}
    r = await http.post(URL, json=late, headers=gateway)
    assert r.status_code == 422
    assert [d["field"] for d in r.json()["error"]["details"]] == ["events.0.occurredAt"]
    assert narrow_row(database_url, vid) is None and event_count(database_url, prefix) == 0
    assert vehicle_row(database_url, vid)["last_seen_at"] <= datetime.now(UTC)


async def test_a_device_ahead_within_the_skew_cannot_freeze_its_values(
    http: httpx.AsyncClient, gateway: dict, viewer: dict, database_url: str, prefix: str
) -> None:
    """A heartbeat dated 290 s ahead is taken, but as of its arrival: the next honest one
    (sent after it arrived) wins, and lastSeenAt is never in the future."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ahead = heartbeat(
        vid,
        sent_at=(datetime.now(UTC) + timedelta(seconds=290)).isoformat(),
        battery=10,
        stationary=False,
    )
    assert (await http.post(URL, json={"heartbeats": [ahead]}, headers=gateway)).status_code == 202
    assert vehicle_row(database_url, vid)["last_seen_at"] <= datetime.now(UTC)
    honest = heartbeat(vid, battery=90, stationary=True)  # sent after the first arrived
    assert (await http.post(URL, json={"heartbeats": [honest]}, headers=gateway)).status_code == 202
    one = (await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)).json()["data"]
    assert (one["batteryPercent"], one["stationary"]) == (90, True)
    narrow = narrow_row(database_url, vid)
    assert narrow is not None and narrow["last_seen_at"] <= datetime.now(UTC)


async def test_a_clock_behind_is_online_by_the_receive_time(
    http: httpx.AsyncClient,
    gateway: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    """An offline vehicle whose clock is 400 s behind (more than the offline limit) heartbeats:
    it is online, lastSeenAt the server's receive time; a later heartbeat from its clock
    still orders after its earlier ones (the values follow)."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE vehicles SET status = 'offline', last_seen_at = now() - interval '1 hour'"
            " WHERE id = %s",
            (vid,),
        )
    before = datetime.now(UTC)
    behind = (before - timedelta(seconds=400)).isoformat()
    r = await http.post(URL, json={"heartbeats": [heartbeat(vid, sent_at=behind)]}, headers=gateway)
    assert r.status_code == 202
    row = vehicle_row(database_url, vid)
    assert row["status"] == "in_sync"
    assert before <= row["last_seen_at"] <= datetime.now(UTC)
    one = (await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)).json()["data"]
    assert one["status"] == "in_sync"
    later = (before - timedelta(seconds=390)).isoformat()
    r = await http.post(
        URL, json={"heartbeats": [heartbeat(vid, sent_at=later, battery=33)]}, headers=gateway
    )
    narrow = narrow_row(database_url, vid)
    assert narrow is not None and narrow["battery_percent"] == 33
    await consistent(sessions, [vid])


async def test_a_late_heartbeat_does_not_overwrite_newer_values(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """Delivered after a newer one, an older heartbeat moves lastSeenAt (it arrived) but
    not the values."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    now = datetime.now(UTC)
    newer = heartbeat(vid, sent_at=(now - timedelta(seconds=10)).isoformat(), battery=70)
    older = heartbeat(vid, sent_at=(now - timedelta(seconds=60)).isoformat(), battery=20)
    assert (await http.post(URL, json={"heartbeats": [newer]}, headers=gateway)).status_code == 202
    first = narrow_row(database_url, vid)
    assert (await http.post(URL, json={"heartbeats": [older]}, headers=gateway)).status_code == 202
    second = narrow_row(database_url, vid)
    assert first is not None and second is not None
    assert second["battery_percent"] == 70 and second["heartbeat_at"] == first["heartbeat_at"]
    assert second["last_seen_at"] > first["last_seen_at"]


async def test_a_huge_seq_is_refused_and_the_vehicle_moves_on(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str, sessions: Any
) -> None:
    """`seq` 2^63-1 (or MOTORCADE_MAX_SEQ_JUMP past the server's clock in milliseconds) is 422
    naming the field, nothing of its batch stored; the vehicle's next events still move its
    status, a jump past the stored seq but not past the clock included."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid, "2.0")
    ok = await http.post(
        URL, json={"events": [event(vid, 1, "desired_notified", ds)]}, headers=gateway
    )
    assert ok.status_code == 202
    clock_ms = int(datetime.now(UTC).timestamp() * 1000)
    for seq in (2**63 - 1, clock_ms + 1_000_000 + 600_000):
        body = {"events": [event(vid, 2, "apply_start", ds), event(vid, seq, "ready", ds)]}
        r = await http.post(URL, json=body, headers=gateway)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"
        assert [d["field"] for d in r.json()["error"]["details"]] == ["events.1.seq"]
    assert event_count(database_url, prefix) == 1
    far = 1 + 1_000_000 + 1  # past the stored seq by more than the bound, not past the clock
    edge = {"events": [event(vid, far, "failed", ds, reason="APPLY_FAILED")]}
    assert (await http.post(URL, json=edge, headers=gateway)).status_code == 202
    row = vehicle_row(database_url, vid)
    assert (row["status"], row["last_event_seq"]) == ("failed", far)
    await consistent(sessions, [vid])


async def test_a_group_refuses_only_the_request_whose_seq_jumps(
    database_url: str, prefix: str, sessions: Any
) -> None:
    """In one group, the request holding a seq that jumps too far is refused whole (`invalid`,
    nothing of it stored); the other requests, for the same vehicle too, are written."""
    vid, other = f"{prefix}0", f"{prefix}1"
    insert_vehicles(database_url, [vid, other], release="1.0")

    def request(*items: dict[str, Any]) -> GroupRequest:
        return GroupRequest(
            batch=TelemetryBatch.model_validate_json(json.dumps({"events": items})), scope=Scope()
        )

    good = request(event(vid, 1, "apply_start"))
    bad = request(event(other, 1, "apply_start"), event(vid, 2**62, "ready"))
    fine = request(event(other, 2, "ready"))
    async with sessions() as session:
        await write_group(session, requests=[good, bad, fine], policy=WideWritePolicy())
        await session.commit()
    assert (good.accepted, fine.accepted, bad.accepted) == (1, 1, 0)
    assert bad.invalid is not None and [d["field"] for d in bad.invalid] == ["events.1.seq"]
    assert good.invalid is None and fine.invalid is None
    assert event_count(database_url, prefix) == 2
    assert vehicle_row(database_url, vid)["last_event_seq"] == 1
    assert vehicle_row(database_url, other)["last_event_seq"] == 2
    await consistent(sessions, [vid, other])


async def test_a_counter_restart_with_a_new_epoch_recovers(
    http: httpx.AsyncClient,
    gateway: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    """A reinstalled device counts from 1 again under a greater `epoch`: its events move the
    status again; a late event of the old counter enters the timeline in its place (under the
    old epoch) and moves nothing; the timeline reads newest first across epochs, page by
    page; the consistency check agrees."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid, "2.0")
    old = [
        event(vid, seq, kind, ds)
        for seq, kind in ((4_000, "desired_notified"), (4_001, "apply_start"))
    ]
    assert (await http.post(URL, json={"events": old}, headers=gateway)).status_code == 202
    assert vehicle_row(database_url, vid)["status"] == "updating"
    epoch = int(time.time())
    restarted = [
        {**event(vid, 1, "desired_notified", ds), "epoch": epoch},
        {**event(vid, 2, "failed", ds, reason="APPLY_FAILED"), "epoch": epoch},
    ]
    assert (await http.post(URL, json={"events": restarted}, headers=gateway)).status_code == 202
    row = vehicle_row(database_url, vid)
    assert (row["status"], row["last_event_epoch"], row["last_event_seq"]) == ("failed", epoch, 2)
    late = {"events": [event(vid, 4_002, "ready", ds)]}  # the old counter's, delivered late
    assert (await http.post(URL, json=late, headers=gateway)).status_code == 202
    assert vehicle_row(database_url, vid)["status"] == "failed"
    await consistent(sessions, [vid])
    timeline = await all_pages(http, viewer, f"/api/v1/vehicles/{vid}/timeline?limit=1")
    assert [(e["epoch"], e["seq"]) for e in timeline] == [
        (epoch, 2),
        (epoch, 1),
        (0, 4_002),
        (0, 4_001),
        (0, 4_000),
    ]


async def test_an_epoch_past_the_server_clock_is_refused(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """An epoch is bounded like a time (Unix seconds): a huge one cannot freeze a vehicle
    either."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    body = {"events": [{**event(vid, 1, "apply_start"), "epoch": 2**62}]}
    r = await http.post(URL, json=body, headers=gateway)
    assert r.status_code == 422
    assert [d["field"] for d in r.json()["error"]["details"]] == ["events.0.epoch"]
    assert event_count(database_url, prefix) == 0


@pytest.mark.parametrize("epoch", [0, 1_700_000_000])
async def test_stored_status_matches_a_recomputation_across_epochs(
    http: httpx.AsyncClient,
    gateway: dict,
    database_url: str,
    prefix: str,
    sessions: Any,
    epoch: int,
) -> None:
    """Vehicles whose events of two epochs arrive in every order, with heartbeats: the stored
    status equals the recomputed one."""
    ids = [f"{prefix}{i:02d}" for i in range(24)]
    insert_vehicles(database_url, ids, release="1.0")
    dss = {v: set_desired(database_url, v, "2.0") for v in ids}
    kinds = ["desired_notified", "apply_start", "ready", "failed", "blocked"]
    batches: list[list[dict[str, Any]]] = [[], [], []]
    for n, v in enumerate(ids):
        for e, seq in ((0, 7), (0, 8), (epoch + 5, 1), (epoch + 5, 2))[: 1 + n % 4]:
            kind = kinds[(n + seq + e) % 5]
            reason = {"failed": "APPLY_FAILED", "blocked": "NOT_STATIONARY"}.get(kind)
            body = event(v, seq, kind, dss[v], reason=reason)
            if e:
                body["epoch"] = e
            batches[(n + seq) % 3].append(body)
    results = []
    for order in (batches, batches[::-1]):
        results += [await http.post(URL, json={"events": b}, headers=gateway) for b in order]
    hbs = [heartbeat(v, actual="2.0" if i % 5 == 0 else "1.0") for i, v in enumerate(ids)]
    results.append(await http.post(URL, json={"heartbeats": hbs}, headers=gateway))
    assert all(r.status_code == 202 for r in results)
    await consistent(sessions, ids)


async def test_a_tie_on_epoch_and_seq_keeps_the_first_stored_and_recompute_agrees(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str, sessions: Any
) -> None:
    """A buggy device sends two events with the same `(epoch, seq)` in two requests, the
    second with a lower event id and another type: the first stored stays the latest (the
    write path replaces it only for a greater position), and the consistency check picks
    the same one (it ordered ties by event id alone, and reported a mismatch)."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid, "2.0")
    first = event(vid, 1, "apply_start", ds)
    first["eventId"] = "ffffffff-ffff-4fff-bfff-ffffffffffff"
    second = event(vid, 1, "failed", ds, reason="APPLY_FAILED")
    second["eventId"] = "00000000-0000-4000-8000-000000000000"
    for item in (first, second):
        r = await http.post(URL, json={"events": [item]}, headers=gateway)
        assert r.status_code == 202, r.text
    assert vehicle_row(database_url, vid)["status"] == "updating"
    await consistent(sessions, [vid])
