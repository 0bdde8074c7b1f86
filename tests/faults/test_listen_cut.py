"""The stream hub's PostgreSQL connections terminated under open streams (services/stream.py
`StreamHub`: one LISTEN connection and one reading connection per API process), as a
failover, a pooler or an operator's `pg_terminate_backend` does.

A writer adds change-feed rows all along (before, during and after each cut, from its own
connection: as another replica's writes arrive). The subscriber, an SSE client of a real
`motorcade api` process, must receive every one of them: on its open stream, or, if the
stream ends or says `resync`, by resuming with `Last-Event-ID` (the backfill).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from core.auth import mint_dev_token
from devtools.localservers import free_port, start_role_process, stop_process, wait_http_ready
from models.enums import Role
from tests.api.stream import SSE, delta, feed_vehicles

pytestmark = pytest.mark.slow

LISTEN_QUERY = "LISTEN motorcade_change_feed"


def _terminate(db: str, where: str, params: tuple[Any, ...] = ()) -> list[int]:
    """pg_terminate_backend on the API's backends that match `where`; their pids."""
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND " + where,
            params,
        ).fetchall()
    return [int(pid) for pid, ended in rows if ended]


def _hub_backends(db: str) -> tuple[list[int], list[int]]:
    """The hub's LISTEN backend (its last query is the LISTEN) and its reading backend (the
    hub opens it just before the LISTEN connection: the backend started last before it)."""
    with psycopg.connect(db, autocommit=True) as conn:
        listen = conn.execute(
            "SELECT pid, backend_start FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = %s",
            (LISTEN_QUERY,),
        ).fetchall()
        if len(listen) != 1:
            return [int(r[0]) for r in listen], []
        reader = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid NOT IN (pg_backend_pid(), %s) AND backend_type = 'client backend'"
            " AND backend_start <= %s ORDER BY backend_start DESC LIMIT 1",
            (listen[0][0], listen[0][1]),
        ).fetchall()
    return [int(listen[0][0])], [int(r[0]) for r in reader]


class Subscriber:
    """A stream client that resumes with Last-Event-ID when its stream ends or resyncs."""

    def __init__(self, base: str, headers: dict[str, str], prefix: str) -> None:
        self.base = base
        self.headers = headers
        self.prefix = prefix
        self.last_id: str | None = None
        self.seen: dict[str, float] = {}  # marker -> monotonic time received
        self.resyncs: list[dict[str, Any]] = []
        self.reopened = 0
        self.duplicates: list[str] = []
        self.ids: set[str] = set()
        self.stop = asyncio.Event()
        self.subscribed = asyncio.Event()  # the first stream is registered with the hub

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                headers = dict(self.headers)
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                async with client.stream(
                    "GET", "/api/v1/stream", headers=headers, params={"topics": "vehicles"}
                ) as r:
                    if r.status_code == 503:
                        await r.aread()
                        await asyncio.sleep(0.2)
                        continue
                    assert r.status_code == 200, await r.aread()
                    sse = SSE(r)
                    while not self.stop.is_set():
                        item = await sse.next()
                        if item is None:
                            break  # the stream ended: resume
                        if "comment" in item:
                            if item["comment"] == "subscribed":
                                self.subscribed.set()
                            continue
                        if item.get("event") == "resync":
                            self.resyncs.append(item)
                            break
                        self._take(item)
                self.reopened += 1

    def _take(self, item: dict[str, Any]) -> None:
        event_id = item.get("id")
        if event_id is not None:
            if event_id in self.ids:
                self.duplicates.append(event_id)
            self.ids.add(event_id)
            self.last_id = event_id
        if item.get("event") != "vehicle.updated":
            return
        for d in item["data"].get("vehicles", []):
            if str(d.get("id", "")).startswith(self.prefix):
                self.seen.setdefault(d["id"], time.monotonic())


class Writer(threading.Thread):
    """Change-feed rows, one marker vehicle each, every few milliseconds until stopped."""

    def __init__(self, db: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.prefix = prefix
        self.written: dict[str, float] = {}  # marker -> monotonic time committed
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            marker = f"{self.prefix}{n:05d}"
            feed_vehicles(self.db, [delta(marker)])
            self.written[marker] = time.monotonic()
            n += 1
            time.sleep(0.02)


async def test_streams_miss_nothing_when_the_hub_connections_are_cut(
    own_database: str, dev_key: str
) -> None:
    db = own_database
    prefix = f"LC{uuid.uuid4().hex[:5]}-"
    headers = {"Authorization": f"Bearer {mint_dev_token(dev_key, role=Role.VIEWER)}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_role_process("api", db, dev_key, port, quiet=True)
    subscriber = Subscriber(base, headers, prefix)
    writer = Writer(db, prefix)
    figures: dict[str, Any] = {}
    try:
        await wait_http_ready(base, path="/healthz", within=60)
        reading = asyncio.create_task(subscriber.run())
        async with asyncio.timeout(60):
            await subscriber.subscribed.wait()
        first = feed_vehicles(db, [delta(f"{prefix}first")])
        deadline = time.monotonic() + 30
        while f"{prefix}first" not in subscriber.seen:
            assert not reading.done(), reading
            assert time.monotonic() < deadline, "the stream delivered nothing"
            await asyncio.sleep(0.05)
        assert subscriber.last_id == str(first)
        writer.start()
        await asyncio.sleep(1.0)
        for cut in ("listen", "reader", "both"):
            listen, reader = await asyncio.to_thread(_hub_backends, db)
            assert len(listen) == 1 and len(reader) == 1, (listen, reader)
            pids = {"listen": listen, "reader": reader, "both": listen + reader}[cut]
            with psycopg.connect(db, autocommit=True) as conn:
                ended = conn.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                    " FROM unnest(%s::int[]) AS pid",
                    (pids,),
                ).fetchone()
            assert ended == (len(pids),)
            cut_at = time.monotonic()
            await asyncio.sleep(0.3)
            marker = f"{prefix}after-{cut}"
            await asyncio.to_thread(feed_vehicles, db, [delta(marker)])
            written = time.monotonic()
            while marker not in subscriber.seen:
                assert time.monotonic() - written < 30, f"after the {cut} cut: not delivered"
                assert not reading.done(), reading
                await asyncio.sleep(0.02)
            figures[cut] = round(subscriber.seen[marker] - written, 2)
            # The hub holds new connections (it reconnected rather than limping on).
            new_listen, new_reader = await asyncio.to_thread(_hub_backends, db)
            assert len(new_listen) == 1 and len(new_reader) == 1
            assert not set(new_listen + new_reader) & set(pids)
            figures[f"{cut}_reconnected_within"] = round(time.monotonic() - cut_at, 2)
            await asyncio.sleep(0.5)
        writer.halt.set()
        await asyncio.to_thread(writer.join, 10)
        expected = set(writer.written)
        deadline = time.monotonic() + 30
        while not expected <= set(subscriber.seen) and time.monotonic() < deadline:
            assert not reading.done(), reading
            await asyncio.sleep(0.05)
    finally:
        writer.halt.set()
        subscriber.stop.set()
        stop_process(proc, timeout=10)
    missing = sorted(expected - set(subscriber.seen))
    print(
        f"\nlisten cut: rows written {len(expected)}, delivery after the cut (s) {figures},"
        f" resyncs {len(subscriber.resyncs)}, streams reopened {subscriber.reopened}"
    )
    assert missing == [], f"{len(missing)} rows never reached the subscriber: {missing[:5]}"
    assert subscriber.duplicates == []
    assert all(json.dumps(r).count("resync") for r in subscriber.resyncs)
