"""No request fails its neighbours in a group commit (issue 19), on the real app over real
PostgreSQL: what PostgreSQL would refuse is refused by validation, with its request alone; a
group that fails all the same is written again request by request, so only the guilty one
fails (422 for a value PostgreSQL refuses, 500 for anything else); a serialization failure or
deadlock raised by psycopg on the driver connection is retried like the ORM's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from api.app import create_app
from core.settings import Settings, normalize_database_url
from services.ingest import TelemetryIngestor
from tests.api.conftest import HOLD_INGEST_WRITER, serve_app
from tests.api.telemetry import URL, event, event_count, heartbeat
from tests.factories import insert_vehicles


async def test_one_nul_request_among_fifty_good_ones_fails_alone(
    http: httpx.AsyncClient, gateway: dict, database_url: str, prefix: str
) -> None:
    """The issue's acceptance test: 1 request with a NUL byte among 50 good ones, sent
    together, 20 rounds: every good one 202, every bad one 422, the bad events stored nowhere
    (neither the timeline nor the vehicles' rows), the good ones all stored."""
    vids = [f"{prefix}{i:02d}" for i in range(50)]
    insert_vehicles(database_url, vids, release="1.0")
    nul = "\u0000"
    places: list[Callable[[str, int], dict[str, Any]]] = [
        lambda vid, seq: {"events": [event(vid, seq, "ready", details={"note": f"a{nul}"})]},
        lambda vid, seq: {"events": [event(vid, seq, "ready", details={f"k{nul}": 1})]},
        lambda vid, seq: {"events": [event(vid, seq, "ready", details={"a": [{"b": nul}]})]},
        lambda vid, seq: {"events": [event(vid, seq, "ready", release=f"9{nul}")]},
        lambda vid, seq: {"events": [event(vid + nul, seq, "ready")]},
        lambda vid, seq: {
            "heartbeats": [heartbeat(vid, actual=f"9{nul}")],
            "events": [event(vid, seq, "ready")],
        },
    ]
    bad_ids: list[str] = []
    for rnd in range(20):
        good = [{"events": [event(vid, rnd + 1, "apply_start")]} for vid in vids]
        bad = places[rnd % len(places)](vids[rnd % 50], 1000 + rnd)
        bad_ids += [e["eventId"] for e in bad["events"]]
        at = (rnd * 7) % 51
        bodies = [*good[:at], bad, *good[at:]]
        answers = await asyncio.gather(*(http.post(URL, json=b, headers=gateway) for b in bodies))
        codes = [r.status_code for r in answers]
        assert codes[at] == 422, (rnd, answers[at].text)
        assert answers[at].json()["error"]["code"] == "VALIDATION_ERROR"
        assert codes[:at] + codes[at + 1 :] == [202] * 50, (rnd, codes)
    assert event_count(database_url, prefix) == 50 * 20
    with psycopg.connect(database_url) as conn:
        stored_bad = conn.execute(
            "SELECT count(*) FROM timeline_events WHERE event_id = ANY(%s::uuid[])", (bad_ids,)
        ).fetchone()
        rows = conn.execute(
            "SELECT v.last_event_seq, v.last_event_type, v.actual_release_version,"
            " t.actual_release_version FROM vehicles v"
            " LEFT JOIN vehicle_telemetry t ON t.vehicle_id = v.id WHERE v.id = ANY(%s)",
            (vids,),
        ).fetchall()
    assert stored_bad == (0,)
    assert len(rows) == 50
    assert all(r[0] == 20 and r[1] == "apply_start" for r in rows), rows
    assert all(r[2] == "1.0" and r[3] in (None, "1.0") for r in rows), rows


@dataclass
class OwnApp:
    """The real app on a database of the test's own (its schema altered by the test)."""

    base: str
    url: str  # libpq URL of the database
    app: FastAPI

    @property
    def ingestor(self) -> TelemetryIngestor:
        ingestor = self.app.state.ingestor
        assert isinstance(ingestor, TelemetryIngestor)
        return ingestor


@pytest.fixture(params=["api", "ingest"])
async def own_app(
    api_settings: Settings, own_database: str, request: pytest.FixtureRequest
) -> AsyncIterator[OwnApp]:
    """`motorcade api` or `motorcade ingest` (the same app, its ingestion role alone)."""
    settings = api_settings.model_copy(
        update={"database_url": normalize_database_url(own_database), "ingest_writers": 1}
    )
    app = create_app(settings, role=request.param)
    async with serve_app(app) as base:
        yield OwnApp(base, own_database, app)


async def _until(check: Callable[[], Any], what: str) -> None:
    for _ in range(400):
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


@asynccontextmanager
async def _writer_held(
    own: OwnApp, client: httpx.AsyncClient, headers: dict
) -> AsyncIterator[None]:
    """While the body runs, the ingest writer is stuck inside a group of one plug request (on
    a lock of `timeline_events`), so every request sent meanwhile queues; on exit the lock
    goes and the writer takes everything queued as its next group."""
    insert_vehicles(own.url, ["plug"], release="1.0")
    blocker = await psycopg.AsyncConnection.connect(own.url)
    await blocker.execute(HOLD_INGEST_WRITER)
    plug = asyncio.create_task(
        client.post(URL, json={"events": [event("plug", 1, "apply_start")]}, headers=headers)
    )

    async def writer_waits() -> bool:
        async with await psycopg.AsyncConnection.connect(own.url) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks"
                " WHERE NOT granted AND relation = 'timeline_events'::regclass"
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    await _until(writer_waits, "the plug's group waits on the lock")
    try:
        yield
    finally:
        await blocker.rollback()
        await blocker.close()
        assert (await plug).status_code == 202


async def _one_group(
    own: OwnApp, client: httpx.AsyncClient, headers: dict, bodies: Sequence[dict[str, Any]]
) -> list[httpx.Response]:
    """Post `bodies` so that they are written as one group (all queued behind the plug)."""
    items = sum(max(1, len(b.get("events", [])) + len(b.get("heartbeats", []))) for b in bodies)
    async with _writer_held(own, client, headers):
        sent = [asyncio.create_task(client.post(URL, json=b, headers=headers)) for b in bodies]
        await _until(lambda: own.ingestor.queued_items == 1 + items, "every request queued")
    return list(await asyncio.gather(*sent))


def _failed_requests(kind: str) -> float:
    """motorcade_ingest_failed_requests_total{kind} of this process (/metrics)."""
    labels = {"kind": kind}
    return REGISTRY.get_sample_value("motorcade_ingest_failed_requests_total", labels) or 0.0


async def test_a_group_postgresql_fails_is_written_request_by_request(
    own_app: OwnApp, gateway: dict
) -> None:
    """Two requests PostgreSQL itself refuses, values validation cannot know about (a CHECK
    constraint, a trigger raising), among ten good ones in one group: the group fails, its
    requests are written one by one: the good ones 202 and stored, the one refused by the
    constraint (a data error, SQLSTATE 23514) 422, the one refused by the trigger (P0001, not
    the caller's data) 500, each alone, nothing of either stored. Before: 12 x 500."""
    url = own_app.url
    good_ids = [f"good-{i}" for i in range(10)]
    insert_vehicles(url, [*good_ids, "poisoned", "boom"], release="1.0")
    with psycopg.connect(url) as conn:
        conn.execute(
            "ALTER TABLE timeline_events ADD CONSTRAINT no_poison"
            " CHECK (reason_code IS DISTINCT FROM 'POISON')"
        )
        conn.execute(
            """CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.vehicle_id = 'boom' THEN RAISE EXCEPTION 'boom'; END IF;
                RETURN NEW;
            END $$"""
        )
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT OR UPDATE ON vehicle_telemetry"
            " FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    good = [
        {"heartbeats": [heartbeat(vid)], "events": [event(vid, 1, "apply_start")]}
        for vid in good_ids
    ]
    poisoned = {"events": [event("poisoned", 1, "failed", reason="POISON")]}
    boom = {"heartbeats": [heartbeat("boom")], "events": [event("boom", 1, "apply_start")]}
    bodies = [*good[:4], poisoned, *good[4:8], boom, *good[8:]]
    counted = {kind: _failed_requests(kind) for kind in ("data", "internal")}
    async with httpx.AsyncClient(base_url=own_app.base, timeout=30) as client:
        answers = await _one_group(own_app, client, gateway, bodies)
    codes = [r.status_code for r in answers]
    assert codes == [202] * 4 + [422] + [202] * 4 + [500] + [202] * 2, [r.text for r in answers]
    refused = answers[4].json()["error"]
    assert refused["code"] == "VALIDATION_ERROR"
    assert "23514" in refused["message"] and "POISON" not in answers[4].text
    assert "no_poison" not in answers[4].text and "INSERT" not in answers[4].text
    failed = answers[9].json()["error"]
    assert failed["code"] == "INTERNAL" and "boom" not in failed["message"]
    assert all(r.json()["data"]["accepted"] == 1 for r in answers if r.status_code == 202)
    stats = own_app.ingestor.stats
    assert stats.isolated_groups == 1 and stats.failed_requests == 2
    assert {k: _failed_requests(k) - n for k, n in counted.items()} == {"data": 1, "internal": 1}
    assert event_count(url, "good-") == 10
    assert event_count(url, "poisoned") == 0 and event_count(url, "boom") == 0
    with psycopg.connect(url) as conn:
        seqs: dict[str, int] = dict(
            conn.execute("SELECT id, last_event_seq FROM vehicles WHERE id <> 'plug'").fetchall()
        )
        heard = conn.execute("SELECT vehicle_id FROM vehicle_telemetry ORDER BY 1").fetchall()
    assert seqs == {**dict.fromkeys(good_ids, 1), "poisoned": 0, "boom": 0}
    assert [h[0] for h in heard] == sorted(good_ids)


@pytest.mark.parametrize("condition", ["serialization_failure", "deadlock_detected"])
async def test_contention_on_the_driver_connection_is_retried(
    own_app: OwnApp, gateway: dict, condition: str
) -> None:
    """A serialization failure (40001) or deadlock (40P01) raised by a statement on the
    psycopg connection itself (the narrow-row upsert, services/telemetry/heartbeats.py), not
    through SQLAlchemy: the group is written again and the request answered 202. Real
    PostgreSQL raises it, the first time only (a sequence does not roll back with the failed
    transaction). Before: psycopg's error escaped the retry, which caught only SQLAlchemy's
    wrapped errors: a 500."""
    url = own_app.url
    insert_vehicles(url, ["contended", "calm"], release="1.0")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE SEQUENCE contention")
        conn.execute(
            f"""CREATE FUNCTION contend() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.vehicle_id = 'contended' AND nextval('contention') = 1 THEN
                    RAISE EXCEPTION 'contended' USING ERRCODE = '{condition}';
                END IF;
                RETURN NEW;
            END $$"""
        )
        conn.execute(
            "CREATE TRIGGER contend BEFORE INSERT OR UPDATE ON vehicle_telemetry"
            " FOR EACH ROW EXECUTE FUNCTION contend()"
        )
    body = {
        "heartbeats": [heartbeat("contended"), heartbeat("calm")],
        "events": [event("contended", 1, "apply_start"), event("calm", 1, "apply_start")],
    }
    async with httpx.AsyncClient(base_url=own_app.base, timeout=30) as client:
        r = await client.post(URL, json=body, headers=gateway)
    assert r.status_code == 202, r.text
    assert r.json()["data"]["accepted"] == 2
    assert own_app.ingestor.stats.retries == 1
    assert own_app.ingestor.stats.isolated_groups == 0
    assert event_count(url, "contended") == 1 and event_count(url, "calm") == 1
    with psycopg.connect(url) as conn:
        fired = conn.execute("SELECT last_value FROM contention").fetchone()
    assert fired == (2,)  # raised once, then passed on the group's second attempt
