"""Live updates (SPEC.md, Server-Sent Events): the real app on a real port, real PostgreSQL,
an HTTP client reading the event stream as it arrives."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from api.app import create_app
from core.auth import Principal
from core.settings import Settings
from devtools.localservers import free_port
from models.enums import AuditSource, Role
from services import audit, stream
from services.fleet import refresh_fleet_counts
from tests.api.conftest import bearer, insert_release, insert_vehicles, samples, serve_app
from tests.api.telemetry import URL as TELEMETRY
from tests.api.telemetry import event as telemetry_event
from tests.api.telemetry import set_desired
from tests.api.test_envelopes import assert_error

# Reading the stream never waits longer than this for the next line: a guard against a hang
# (a failure), not a measured time.
READ_GUARD = 30


class SSE:
    """An event-stream reader: `next()` returns the next event (a dict with `event`, `id`,
    `data`) or comment (`{"comment": text}`); None at the end of the stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self) -> dict[str, Any] | None:
        event: dict[str, Any] = {}
        while True:
            try:
                line = await asyncio.wait_for(anext(self.lines), READ_GUARD)
            except StopAsyncIteration:
                return event or None
            if line == "":
                if event:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    return event
                continue
            if line.startswith(":"):
                if not event:
                    return {"comment": line[1:].strip()}
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data" and "data" in event:
                event["data"] += "\n" + value
            else:
                event[name] = value

    async def event(self) -> dict[str, Any] | None:
        """The next event, comments skipped."""
        while True:
            item = await self.next()
            if item is None or "comment" not in item:
                return item

    async def mine(self, marker: str) -> dict[str, Any]:
        """The next event whose data mentions `marker` (rows of other tests skipped)."""
        while True:
            item = await self.event()
            assert item is not None, "the stream ended"
            if item.get("event") == "resync" or marker in json.dumps(item.get("data")):
                return item


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, headers: dict[str, str] | None = None, **params: str
) -> AsyncIterator[SSE]:
    for _ in range(200):  # 503 until the app's hub has connected (just after startup)
        async with client.stream("GET", "/api/v1/stream", headers=headers, params=params) as r:
            if r.status_code != 503:
                break
            await r.aread()
        await asyncio.sleep(0.05)
    async with client.stream("GET", "/api/v1/stream", headers=headers, params=params) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        sse = SSE(r)
        first = await sse.next()  # the stream is registered once this comment arrives
        assert first == {"comment": "subscribed"}, first
        yield sse


def feed_vehicles(database_url: str, deltas: list[dict[str, Any]]) -> int:
    """A `vehicle.updated` row as the telemetry path writes them; its id."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO change_feed (topic, event, payload) VALUES"
            " ('vehicles', 'vehicle.updated', %s) RETURNING id",
            (json.dumps({"vehicles": deltas}),),
        ).fetchone()
        assert row is not None
        return int(row[0])


def delta(vid: str, region: str = "eu-west", status: str = "updating") -> dict[str, Any]:
    return {
        "id": vid,
        "status": status,
        "reasonCodes": [],
        "region": region,
        "model": "atlas",
        "org": None,
    }


@pytest.fixture
def stream_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"stream_keepalive_seconds": 300})


@pytest.fixture
async def app_url(stream_settings: Settings) -> AsyncIterator[str]:
    async with serve_app(stream_settings) as url:
        yield url


@pytest.fixture
async def client(app_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=app_url, timeout=READ_GUARD) as c:
        yield c


@pytest.fixture
def viewer_token(token: Callable[..., str]) -> dict[str, str]:
    return bearer(token("viewer"))


async def test_live_vehicle_update(
    client: httpx.AsyncClient, viewer_token: dict, database_url: str, prefix: str
) -> None:
    async with open_stream(client, viewer_token, topics="vehicles") as sse:
        row_id = feed_vehicles(database_url, [delta(f"{prefix}1"), delta(f"{prefix}2")])
        got = await sse.mine(prefix)
    assert got["event"] == "vehicle.updated"
    assert got["id"] == str(row_id)
    assert [d["id"] for d in got["data"]["vehicles"]] == [f"{prefix}1", f"{prefix}2"]
    assert got["data"]["vehicles"][0]["status"] == "updating"


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    client: httpx.AsyncClient, viewer_token: dict, database_url: str, prefix: str
) -> None:
    async with open_stream(client, viewer_token, topics="vehicles") as sse:
        a = feed_vehicles(database_url, [delta(f"{prefix}a")])
        b = feed_vehicles(database_url, [delta(f"{prefix}b")])
        got = await sse.mine(prefix)
        assert got["id"] == str(a)
    # Disconnected (b not read): more rows meanwhile.
    c = feed_vehicles(database_url, [delta(f"{prefix}c")])
    d = feed_vehicles(database_url, [delta(f"{prefix}d")])
    headers = {**viewer_token, "Last-Event-ID": str(a)}
    async with open_stream(client, headers, topics="vehicles") as sse:
        e = feed_vehicles(database_url, [delta(f"{prefix}e")])
        seen = [await sse.mine(prefix) for _ in range(4)]
        f = feed_vehicles(database_url, [delta(f"{prefix}f")])
        seen.append(await sse.mine(prefix))
    assert [int(s["id"]) for s in seen] == [b, c, d, e, f]
    assert [s["data"]["vehicles"][0]["id"] for s in seen] == [f"{prefix}{x}" for x in "bcdef"]
    # The query parameter does what the header does.
    async with open_stream(client, viewer_token, topics="vehicles", lastEventId=str(d)) as sse:
        assert int((await sse.mine(prefix))["id"]) == e
        assert int((await sse.mine(prefix))["id"]) == f


async def test_a_row_committed_after_a_later_id_is_not_skipped(
    client: httpx.AsyncClient, viewer_token: dict, database_url: str, prefix: str
) -> None:
    insert = (
        "INSERT INTO change_feed (topic, event, payload) VALUES"
        " ('vehicles', 'vehicle.updated', %s) RETURNING id"
    )
    async with open_stream(client, viewer_token, topics="vehicles") as sse:
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
            with psycopg.connect(database_url) as conn:
                conn.execute(
                    "INSERT INTO change_feed (topic, event, payload)"
                    " SELECT 'vehicles', 'vehicle.updated',"
                    " jsonb_build_object('vehicles', jsonb_build_array(jsonb_build_object("
                    " 'id', %s || n, 'region', 'eu-west', 'model', 'atlas', 'org', NULL,"
                    " 'status', 'updating'))) FROM generate_series(1, 50) n",
                    (prefix,),
                )
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


async def test_scoped_viewer_sees_only_its_vehicles_rollouts_and_audit(
    client: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    sessions: async_sessionmaker[AsyncSession],
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
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO change_feed (topic, event, entity_id, payload)"
                " VALUES ('rollouts', 'rollout.updated', %s, %s)",
                (rollout_id, json.dumps({"id": int(rollout_id), "marker": prefix})),
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
    viewer_token: dict,
    prefix: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with open_stream(client, viewer_token, topics="audit") as sse:
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
        (device, 403, "FORBIDDEN"),
    ):
        response = await client.get("/api/v1/stream", params={"ticket": bad})
        assert_error(response, status, code)
    assert_error(await client.get("/api/v1/stream"), 401, "UNAUTHENTICATED")
    assert_error(await client.post("/api/v1/stream/tickets"), 401, "UNAUTHENTICATED")
    device_token = bearer(token("device", vehicle_id=f"{prefix}car"))
    assert_error(
        await client.post("/api/v1/stream/tickets", headers=device_token), 403, "FORBIDDEN"
    )


async def test_bad_query_is_a_validation_error(
    client: httpx.AsyncClient, viewer_token: dict
) -> None:
    for params, headers in (
        ({"topics": "vehicles,weather"}, {}),
        ({"lastEventId": "abc"}, {}),
        ({}, {"Last-Event-ID": "-3"}),
    ):
        response = await client.get(
            "/api/v1/stream", params=params, headers={**viewer_token, **headers}
        )
        assert_error(response, 422, "VALIDATION_ERROR")


async def test_keep_alive_comments(settings: Settings, token: Callable[..., str]) -> None:
    quick = settings.model_copy(update={"stream_keepalive_seconds": 0.2})
    async with serve_app(quick) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, bearer(token("viewer")), topics="audit") as sse:
            comments: list[str] = []
            while len(comments) < 2:
                item = await sse.next()
                assert item is not None
                if "comment" in item:
                    comments.append(item["comment"])
    assert all(c.startswith("ping") for c in comments), comments


async def test_a_client_that_reads_nothing_is_let_go(
    settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    """A subscriber that stops reading (a hung tab, a dead proxy that keeps the socket):
    once an event write has been blocked for `stream_stall_seconds`, the next keep-alive ends
    the stream, so its subscription and task are released instead of held until TCP gives
    up."""
    quick = settings.model_copy(
        update={
            "stream_keepalive_seconds": 0.3,
            "stream_stall_seconds": 1.0,
            "stream_queue_max_events": 100_000,  # not dropped as slow: it must stall
        }
    )
    viewer = bearer(token("viewer"))
    async with serve_app(quick) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, viewer, topics="vehicles"):
            pass  # the hub is up
        host, port = url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()  # the server runs on it too: no blocking calls
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        try:
            await loop.sock_sendall(
                sock,
                f"GET /api/v1/stream?topics=vehicles HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: {viewer['Authorization']}\r\n\r\n".encode(),
            )
            head = b""
            while b"subscribed" not in head:
                head += await asyncio.wait_for(loop.sock_recv(sock, 4096), READ_GUARD)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]

            async def subscribers() -> tuple[float, float]:
                text = (await client.get("/metrics", headers=viewer)).text
                return (
                    samples(text, "motorcade_sse_subscribers")[""],
                    samples(text, "motorcade_sse_stalled_total").get("", 0),
                )

            assert await subscribers() == (1, 0)
            # About 20 MB of events, far more than the socket buffers hold: the writes block.
            with psycopg.connect(database_url) as conn:
                conn.execute(
                    "INSERT INTO change_feed (topic, event, payload)"
                    " SELECT 'vehicles', 'vehicle.updated', jsonb_build_object('vehicles',"
                    " (SELECT jsonb_agg(jsonb_build_object('id', %s || n || '-' || m,"
                    " 'region', 'eu-west', 'model', 'atlas', 'org', NULL, 'status', 'updating',"
                    " 'reasonCodes', '[]'::jsonb)) FROM generate_series(1, 500) m))"
                    " FROM generate_series(1, 400) n",
                    (prefix,),
                )
            for _ in range(300):
                if await subscribers() == (0, 1):
                    break
                await asyncio.sleep(0.05)
            assert await subscribers() == (0, 1)
            # What the server had written before it stopped is still readable; then the end.
            while await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), READ_GUARD):
                pass
        finally:
            sock.close()


async def test_shutdown_with_an_open_stream_is_prompt(
    settings: Settings, token: Callable[..., str]
) -> None:
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        async with open_stream(client, bearer(token("viewer"))) as sse:
            hub = app.state.stream
            assert len(hub.subscribers) == 1
            assert hub.connections_open == 2  # one listening, one reading
            server.should_exit = True
            # No graceful-shutdown timeout is configured: uvicorn returns only once the open
            # stream has ended. The guard turns a hang into a failure.
            await asyncio.wait_for(task, READ_GUARD)
            while (item := await sse.next()) is not None:
                assert "comment" in item
    assert not hub.subscribers
    assert hub.connections_open == 0  # the lifespan's shutdown closed them


async def test_disconnected_client_is_reclaimed(app_url: str, viewer_token: dict) -> None:
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        async with open_stream(client, viewer_token):
            pass
    # The app of this test: its hub, reached through the served app's state.
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        for _ in range(200):
            metrics = (await client.get("/metrics", headers=viewer_token)).text
            if (open_streams := samples(metrics, "motorcade_sse_subscribers")[""]) == 0:
                break
            await asyncio.sleep(0.05)
        assert open_streams == 0


async def test_a_fleet_summary_refresh_is_published_in_its_transaction(
    client: httpx.AsyncClient,
    viewer_token: dict,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with open_stream(client, viewer_token, topics="vehicles") as sse:
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
    a resume from before them cannot be served event by event."""
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
            assert await sse.next() is None
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
