"""Delivery: live events, resuming without gap or duplicate, commit order, resync for a slow
or stale subscriber, events written by other paths (fleet summary, telemetry), the hub
reconnecting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import psycopg

from api.app import create_app
from core.settings import Settings
from services.fleet import refresh_fleet_counts
from tests.api.conftest import bearer, serve_app
from tests.api.stream import delta, feed_burst, feed_vehicles, open_stream
from tests.api.telemetry import URL as TELEMETRY
from tests.api.telemetry import event as telemetry_event
from tests.api.telemetry import set_desired
from tests.factories import Sessions, insert_vehicles


async def test_live_vehicle_update(
    client: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    async with open_stream(client, viewer, topics="vehicles") as sse:
        row_id = feed_vehicles(database_url, [delta(f"{prefix}1"), delta(f"{prefix}2")])
        got = await sse.mine(prefix)
    assert got["event"] == "vehicle.updated"
    assert got["id"] == str(row_id)
    assert [d["id"] for d in got["data"]["vehicles"]] == [f"{prefix}1", f"{prefix}2"]
    assert got["data"]["vehicles"][0]["status"] == "updating"


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    client: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    async with open_stream(client, viewer, topics="vehicles") as sse:
        a = feed_vehicles(database_url, [delta(f"{prefix}a")])
        b = feed_vehicles(database_url, [delta(f"{prefix}b")])
        got = await sse.mine(prefix)
        assert got["id"] == str(a)
    # Disconnected (b not read): more rows meanwhile.
    c = feed_vehicles(database_url, [delta(f"{prefix}c")])
    d = feed_vehicles(database_url, [delta(f"{prefix}d")])
    headers = {**viewer, "Last-Event-ID": str(a)}
    async with open_stream(client, headers, topics="vehicles") as sse:
        e = feed_vehicles(database_url, [delta(f"{prefix}e")])
        seen = [await sse.mine(prefix) for _ in range(4)]
        f = feed_vehicles(database_url, [delta(f"{prefix}f")])
        seen.append(await sse.mine(prefix))
    assert [int(s["id"]) for s in seen] == [b, c, d, e, f]
    assert [s["data"]["vehicles"][0]["id"] for s in seen] == [f"{prefix}{x}" for x in "bcdef"]
    # The query parameter does what the header does.
    async with open_stream(client, viewer, topics="vehicles", lastEventId=str(d)) as sse:
        assert int((await sse.mine(prefix))["id"]) == e
        assert int((await sse.mine(prefix))["id"]) == f
    # Both: the later wins (an EventSource opened with lastEventId= reconnects to the same URL
    # and sends the id of the last event it received in the header): no event twice.
    headers = {**viewer, "Last-Event-ID": str(e)}
    async with open_stream(client, headers, topics="vehicles", lastEventId=str(c)) as sse:
        assert int((await sse.mine(prefix))["id"]) == f


async def test_a_row_committed_after_a_later_id_is_not_skipped(
    client: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    insert = (
        "INSERT INTO change_feed (topic, event, payload) VALUES"
        " ('vehicles', 'vehicle.updated', %s) RETURNING id"
    )
    async with open_stream(client, viewer, topics="vehicles") as sse:
        with psycopg.connect(database_url) as early, psycopg.connect(database_url) as late:
            first = early.execute(insert, (json.dumps({"vehicles": [delta(f"{prefix}x")]}),))
            first_id = first.fetchone()[0]  # type: ignore[index]
            rolled_back = psycopg.connect(database_url)
            hole = rolled_back.execute(insert, (json.dumps({"vehicles": [delta("nobody")]}),))
            hole_id = hole.fetchone()[0]  # type: ignore[index]
            second = late.execute(insert, (json.dumps({"vehicles": [delta(f"{prefix}y")]}),))
            second_id = second.fetchone()[0]  # type: ignore[index]
            assert first_id < hole_id < second_id
            late.commit()  # the later id commits first...
            # ...and the hub is woken by it, while `first` and the hole are still open.
            await asyncio.sleep(0.3)
            rolled_back.rollback()
            rolled_back.close()
            early.commit()
        got = [await sse.mine(prefix), await sse.mine(prefix)]
    assert [int(g["id"]) for g in got] == [first_id, second_id]
    assert [g["data"]["vehicles"][0]["id"] for g in got] == [f"{prefix}x", f"{prefix}y"]


async def test_slow_subscriber_is_dropped_with_resync(
    settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    small = settings.model_copy(update={"stream_queue_max_events": 5})
    async with serve_app(small) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, bearer(token("viewer")), topics="vehicles") as sse:
            # One statement of 50 rows: one wake-up fans out more than the bound at once.
            feed_burst(database_url, prefix, 50)
            received = []
            while True:
                item = await sse.event()
                assert item is not None, "the stream ended without a resync event"
                if item["event"] == "resync":
                    break
                received.append(item)
            assert item["data"] == {"reason": "SLOW_SUBSCRIBER"}
            assert "id" not in item
            assert len(received) <= 5
            assert await sse.next() is None  # and the stream is closed


async def test_a_fleet_summary_refresh_is_published_in_its_transaction(
    client: httpx.AsyncClient,
    viewer: dict,
    sessions: Sessions,
) -> None:
    async with open_stream(client, viewer, topics="vehicles") as sse:
        async with sessions() as session, session.begin():
            await refresh_fleet_counts(session)
        while True:
            got = await sse.event()
            assert got is not None, "the stream ended"
            if got["event"] == "fleet.summary":
                break
    assert got["data"]["reason"] == "refreshed"
    assert got["data"]["refreshedAt"]


async def test_a_last_event_id_older_than_the_feed_gets_resync(
    settings: Settings, token: Callable[..., str], own_database: str
) -> None:
    """The feed of a database of its own loses its first rows (as a retention purge would):
    a resume from before them cannot be served event by event: one resync, then live
    events."""
    url = own_database
    ids = [feed_vehicles(url, [delta(f"purged-{n}")]) for n in range(3)]
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM change_feed WHERE id < %s", (ids[2],))
    own = settings.model_copy(update={"database_url": url})
    async with serve_app(own) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
        viewer = bearer(token("viewer"))
        async with open_stream(c, viewer, lastEventId=str(ids[0])) as sse:
            got = await sse.event()
            assert got is not None and got["event"] == "resync"
            assert got["data"] == {"reason": "EVENTS_EXPIRED"}
            # Then the live events: the stream goes on.
            live = feed_vehicles(url, [delta("after-resync")])
            got = await sse.event()
            assert got is not None and got["id"] == str(live)
        # From the oldest row still there, the resume is served.
        async with open_stream(c, viewer, lastEventId=str(ids[1])) as sse:
            got = await sse.event()
            assert got is not None and got["id"] == str(ids[2])


async def test_a_status_change_from_telemetry_is_delivered(
    client: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
) -> None:
    """The ingest path (POST /telemetry, its group commit) writes the feed row in the
    transaction of the status change; a scoped viewer of that vehicle's region receives it."""
    vid = f"{prefix}car"
    insert_vehicles(database_url, [vid], region=f"{prefix}r", release="1.0")
    ds = set_desired(database_url, vid)
    scoped = bearer(token("viewer", scopes={"regions": [f"{prefix}r"]}))
    async with open_stream(client, scoped, topics="vehicles") as sse:
        body = {"events": [telemetry_event(vid, 1, "desired_notified", ds)]}
        posted = await client.post(TELEMETRY, json=body, headers=bearer(token("gateway")))
        assert posted.status_code == 202, posted.text
        got = await sse.mine(vid)
    assert got["event"] == "vehicle.updated"
    assert got["data"]["vehicles"] == [
        {
            "id": vid,
            "status": "updating",
            "reasonCodes": [],
            "region": f"{prefix}r",
            "model": "atlas",
            "org": "default",
            **{k: v for k, v in got["data"]["vehicles"][0].items() if k not in DELTA_KEYS},
        }
    ]


DELTA_KEYS = {"id", "status", "reasonCodes", "region", "model", "org"}


async def test_the_hub_reconnects_and_reads_what_was_written_meanwhile(
    settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    app = create_app(settings)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, bearer(token("viewer")), topics="vehicles") as sse:
            hub = app.state.stream
            pids = hub.backend_pids()
            assert len(pids) == 2
            with psycopg.connect(database_url) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,)
                )
            row_id = feed_vehicles(database_url, [delta(f"{prefix}after-outage")])
            got = await sse.mine(prefix)
            assert got["id"] == str(row_id)
            assert not set(hub.backend_pids()) & set(pids)  # new connections


async def test_an_unrelated_open_transaction_does_not_stall_the_feed(
    client: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    """A transaction that holds an xid and never writes the feed (a psql session left open
    after `BEGIN; UPDATE ...`) is not waited for: a hole behind it (an insert rolled back)
    is skipped once its own writer has ended, and the next event arrives while the unrelated
    transaction is still open."""
    insert = (
        "INSERT INTO change_feed (topic, event, payload) VALUES"
        " ('vehicles', 'vehicle.updated', %s) RETURNING id"
    )
    async with open_stream(client, viewer, topics="vehicles") as sse:
        with psycopg.connect(database_url) as unrelated:
            unrelated.execute("SELECT pg_current_xact_id()")  # holds an xid, left open
            with psycopg.connect(database_url) as rolled_back:
                hole = rolled_back.execute(insert, (json.dumps({"vehicles": [delta("none")]}),))
                hole_id = hole.fetchone()[0]  # type: ignore[index]
                rolled_back.rollback()
            after = feed_vehicles(database_url, [delta(f"{prefix}after")])
            assert hole_id < after
            got = await sse.mine(prefix)  # READ_GUARD: a stall fails here
            assert got["id"] == str(after)
            assert unrelated.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            unrelated.rollback()
