"""Limits of a stream: its queue's bytes, the streams one caller may hold, the connections
that resumes use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta

import httpx
import psycopg

from core.settings import Settings
from models.scope import UNRESTRICTED
from services.stream import APPLICATION_NAMES, StreamHub, Subscriber
from tests.api.conftest import bearer, serve_app
from tests.api.stream import SSE, aged_feed_rows, feed_burst, open_stream


async def test_a_subscriber_past_its_bytes_is_dropped_with_resync(
    settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    """Few events (far below the count bound) of many bytes: the byte bound drops it."""
    small = settings.model_copy(
        update={"stream_queue_max_events": 100_000, "stream_queue_max_bytes": 64 << 10}
    )
    async with serve_app(small) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, bearer(token("viewer")), topics="vehicles") as sse:
            # One statement of 40 rows of about 4 KB (160 KB): one wake-up fans them out.
            feed_burst(database_url, prefix, 40, pad=4000)
            received = 0
            while True:
                item = await sse.event()
                assert item is not None, "the stream ended without a resync event"
                if item["event"] == "resync":
                    break
                if prefix in json.dumps(item["data"]):
                    received += 1
                    assert received < 40, "every event was delivered: no byte bound"
            assert item["data"] == {"reason": "SLOW_SUBSCRIBER"}
            assert received <= 16  # 64 KB of 4 KB events
            assert await sse.next() is None


async def test_one_stream_more_than_the_per_caller_cap_is_429(
    settings: Settings, token: Callable[..., str]
) -> None:
    capped = settings.model_copy(update={"stream_max_per_caller": 2})
    alice = bearer(token("viewer", subject="alice"))
    bob = bearer(token("viewer", subject="bob"))
    async with serve_app(capped) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with open_stream(client, alice), open_stream(client, alice):
            async with client.stream("GET", "/api/v1/stream", headers=alice) as refused:
                assert refused.status_code == 429  # (a stream opened would never end a .get)
                body = json.loads(await refused.aread())
            assert body["error"]["code"] == "RATE_LIMITED"
            assert int(refused.headers["Retry-After"]) > 0
            async with open_stream(client, bob):  # another caller is not counted with alice
                pass
        # Closed streams give their places back.
        async with open_stream(client, alice), open_stream(client, alice):
            pass


async def test_a_burst_of_resumes_uses_at_most_the_pool(
    settings: Settings, token: Callable[..., str], own_database: str
) -> None:
    """200 clients resume at once: the reads come from the hub's pool (2 connections here),
    not from a connection each. Counted in pg_stat_activity of a database of the test's own
    (the app's request pool is not touched by a stream)."""
    ids = aged_feed_rows(own_database, [timedelta(0)] * 5)
    own = settings.model_copy(
        update={
            "database_url": own_database,
            "stream_backfill_pool_size": 2,
            "stream_max_per_caller": 0,
        }
    )
    peak = {"all": 0, "backfill": 0}
    done = asyncio.Event()

    async def sample() -> None:
        async with await psycopg.AsyncConnection.connect(own_database, autocommit=True) as conn:
            while not done.is_set():
                row = await (
                    await conn.execute(
                        "SELECT count(*), count(*) FILTER (WHERE application_name = %s)"
                        " FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()",
                        (APPLICATION_NAMES["backfill"],),
                    )
                ).fetchone()
                assert row is not None
                peak["all"] = max(peak["all"], row[0])
                peak["backfill"] = max(peak["backfill"], row[1])
                await asyncio.sleep(0.005)

    viewer = bearer(token("viewer"))
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with (
        serve_app(own) as url,
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client,
    ):
        async with open_stream(client, viewer):
            pass  # the hub is up

        async def resume() -> list[str]:
            headers = {**viewer, "Last-Event-ID": str(ids[0])}
            async with client.stream("GET", "/api/v1/stream", headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                sse = SSE(r)
                return [(await sse.event() or {}).get("id", "") for _ in ids[1:]]

        sampler = asyncio.create_task(sample())
        try:
            got = await asyncio.gather(*(resume() for _ in range(200)))
        finally:
            done.set()
            await sampler
        # The pool keeps its connections a while after the burst: the pool was used (a
        # sample during a burst this short may fall between two checkouts).
        async with await psycopg.AsyncConnection.connect(own_database, autocommit=True) as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = %s",
                    (APPLICATION_NAMES["backfill"],),
                )
            ).fetchone()
        kept = int(row[0]) if row else 0
    assert got == [[str(i) for i in ids[1:]]] * 200  # every resume was served, exactly
    assert peak["backfill"] <= 2 and 1 <= max(peak["backfill"], kept) <= 2, (peak, kept)
    # The hub's listening and reading connections, the pool, and the one connection the
    # app's request pool keeps after its start-up housekeeping (idempotency-key purge).
    assert peak["all"] <= 2 + 2 + 1


def terminate_backfill_connections(database_url: str) -> int:
    """Terminate the stream backfill pool's connections (as a PostgreSQL restart would); how
    many there were."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAMES["backfill"],),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_resume_after_the_pooled_connection_died_is_served(
    settings: Settings, token: Callable[..., str], own_database: str
) -> None:
    """The pool's idle connection is terminated (as by a PostgreSQL restart): the next resume
    gets a fresh one instead of failing."""
    ids = aged_feed_rows(own_database, [timedelta(0)] * 3)
    own = settings.model_copy(update={"database_url": own_database})
    viewer = bearer(token("viewer"))
    async with serve_app(own) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(2):
            async with open_stream(client, viewer, lastEventId=str(ids[0])) as sse:
                assert [(await sse.event() or {}).get("id") for _ in ids[1:]] == [
                    str(i) for i in ids[1:]
                ]
            assert terminate_backfill_connections(own_database) >= 1


async def test_the_backfill_pool_replaces_a_connection_that_died_idle(
    settings: Settings, own_database: str
) -> None:
    """The same, at the hub, without a client's timing: a resume read to its end returns its
    connection to the pool; that connection is terminated while idle; the next resume is
    served on a fresh one (it failed with AdminShutdown when the pool did not check)."""
    ids = aged_feed_rows(own_database, [timedelta(0)] * 3)
    own = settings.model_copy(update={"database_url": own_database})
    hub = StreamHub(own.libpq_database_url, backfill_pool_size=1)
    await hub.start()
    try:
        for _ in range(2):
            sub = Subscriber(topics=frozenset({"vehicles"}), scope=UNRESTRICTED, bound=100)
            pages = [page async for page in hub.backfill(after=ids[0], upto=ids[-1], sub=sub)]
            assert [event.id for page in pages for event in page] == ids[1:]
            assert terminate_backfill_connections(own_database) == 1  # the one, idle
    finally:
        await hub.stop()
