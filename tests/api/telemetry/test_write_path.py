"""What a group of telemetry requests writes (services/telemetry), through POST /telemetry on
the real app over real PostgreSQL, and through `write_group` itself: deduplication, ordering,
stale desired states, statuses and their change-feed rows, rollout outcomes, heartbeats on the
narrow and wide rows, status consistency, and requests refused whole inside a group."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from models.scope import Scope
from models.telemetry import TelemetryBatch
from services.reconcile import mark_offline
from services.telemetry import GroupRequest, WideWritePolicy, recompute_statuses, write_group
from tests.api.telemetry import (
    URL,
    event,
    event_count,
    heartbeat,
    now_iso,
    set_desired,
    vehicle_row,
)
from tests.factories import insert_vehicles


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
    (services/telemetry/events.py `_insert_new_events`); an event id reused under a higher
    seq is a duplicate all the same: the batch is rolled back to its savepoint and inserted
    again, the new events accepted, the old event kept as it was, nothing lost."""
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


def running_rollout(database_url: str, ids: list[str]) -> tuple[int, dict[str, str]]:
    """A running rollout of release 9.9 whose targets are these vehicles, each `notified` of
    its own desired state (as the rollout path leaves them); returns its id and the desired
    state of each vehicle."""
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
            " targets) VALUES ('9.9', 'test', 'running', %s, %s, %s) RETURNING id",
            (len(ids), len(ids), json.dumps({"vehicleIds": ids})),
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
    return rid, dss


def target_states(database_url: str, rid: int) -> dict[str, str]:
    """Each target's state (`failed:REASON` with its reason code) in the rollout."""
    with psycopg.connect(database_url) as conn:
        return dict(
            conn.execute(
                "SELECT vehicle_id, state || coalesce(':' || reason_code, '')"
                " FROM rollout_targets WHERE rollout_id = %s",
                (rid,),
            ).fetchall()
        )


async def test_events_feed_rollout_outcomes(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{i}" for i in range(4)]
    insert_vehicles(database_url, ids, release="1.0")
    rid, dss = running_rollout(database_url, ids)
    a, b, c, d = ids
    events = [
        event(a, 1, "apply_start", dss[a]),
        event(b, 2, "ready", dss[b]),
        event(c, 1, "failed", dss[c], reason="APPLY_FAILED"),
        event(d, 1, "ready", str(uuid.uuid4())),  # another desired state: not a success
    ]
    r = await http.post(URL, json={"events": events}, headers=gateway)
    assert r.status_code == 202
    assert target_states(database_url, rid) == {
        a: "updating",
        b: "succeeded",
        c: "failed:APPLY_FAILED",
        d: "notified",
    }
    with psycopg.connect(database_url) as conn:
        counters = conn.execute(
            "SELECT updating, succeeded, failed, blocked FROM rollouts WHERE id = %s", (rid,)
        ).fetchone()
    assert counters == (1, 1, 1, 0)
    # A late event about the same desired state does not undo the success.
    late = {"events": [event(b, 1, "apply_start", dss[b])]}
    assert (await http.post(URL, json=late, headers=gateway)).status_code == 202
    assert target_states(database_url, rid)[b] == "succeeded"
    with psycopg.connect(database_url) as conn:
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


async def test_heartbeats_coalesce_and_the_wide_row_lags_only_on_last_seen(
    http: httpx.AsyncClient,
    gateway: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    """Latest heartbeat per vehicle wins (by `sentAt`); a heartbeat that changes nothing
    visible refreshes only the narrow row, and GET /vehicles/{id} and the offline marking read
    the fresh one. lastSeenAt is the server's receive time."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0", battery_percent=None)
    start = datetime.now(UTC)
    first = heartbeat(vid, sent_at=(start - timedelta(seconds=30)).isoformat(), battery=80)
    assert (await http.post(URL, json={"heartbeats": [first]}, headers=gateway)).status_code == 202
    base = vehicle_row(database_url, vid)["last_seen_at"]  # battery was unknown: written
    assert start <= base <= datetime.now(UTC)
    newer = (start - timedelta(seconds=10)).isoformat()
    older = (start - timedelta(seconds=20)).isoformat()
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
    assert narrow is not None and narrow[0] > base and narrow[1] == 81
    one = (await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)).json()["data"]
    assert one["batteryPercent"] == 81
    assert datetime.fromisoformat(one["lastSeenAt"].replace("Z", "+00:00")) == narrow[0]
    # A visible change (stationary flips) is written to the wide row at once.
    r = await http.post(
        URL, json={"heartbeats": [heartbeat(vid, stationary=False)]}, headers=gateway
    )
    wide = vehicle_row(database_url, vid)
    assert wide["stationary"] is False and wide["last_seen_at"] > narrow[0]
    # The offline marking trusts the narrow row: a cutoff between the two keeps it online.
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
