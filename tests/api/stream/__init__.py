"""Live updates (SPEC.md, Server-Sent Events): the real app on a real port, real PostgreSQL,
an HTTP client reading the event stream as it arrives. This package's helpers: an event-stream
reader, opening a stream, and change-feed rows written as the telemetry path writes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import psycopg

from tests.streamschema import check_event

# Reading the stream never waits longer than this for the next line: a guard against a hang
# (a failure), not a measured time.
READ_GUARD = 30


class SSE:
    """An event-stream reader: `next()` returns the next event (a dict with `event`, `id`,
    `data`) or comment (`{"comment": text}`; the stream's position, an `id:` alone, as
    `{"comment": "position", "id": ...}`); None at the end of the stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.position: int | None = None  # the stream's position when it opened

    async def next(self) -> dict[str, Any] | None:
        event: dict[str, Any] = {}
        while True:
            try:
                async with asyncio.timeout(READ_GUARD):
                    line = await anext(self.lines)
            except StopAsyncIteration:
                return event or None
            if line == "":
                if event.keys() == {"id"}:  # the stream's position alone: no event
                    return {"comment": "position", "id": event["id"]}
                if event:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    check_event(event)  # as docs/asyncapi.yaml describes it, every one
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
        if "lastEventId" not in params and "Last-Event-ID" not in (headers or {}):
            position = await sse.next()  # then where it stands: a client resumes from there
            assert position is not None and position["comment"] == "position", position
            sse.position = int(position["id"])
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


def feed_burst(database_url: str, prefix: str, count: int, *, pad: int = 0) -> None:
    """`count` `vehicle.updated` rows (vehicles `{prefix}1`...) in one statement, so one
    wake-up of the hub fans them all out at once; with `pad`, that many bytes of padding in
    each payload."""
    padding = ", 'pad', repeat('x', %(pad)s)" if pad else ""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO change_feed (topic, event, payload)"
            " SELECT 'vehicles', 'vehicle.updated',"
            " jsonb_build_object('vehicles', jsonb_build_array(jsonb_build_object("
            " 'id', %(prefix)s || n, 'region', 'eu-west', 'model', 'atlas', 'org', 'default',"
            f" 'status', 'updating'{padding})))"
            " FROM generate_series(1, %(count)s) n",
            {"prefix": prefix, "count": count, "pad": pad},
        )


def aged_feed_rows(database_url: str, ages: list[timedelta]) -> list[int]:
    """`vehicle.updated` rows created `age` ago each, in id order; their ids."""
    with psycopg.connect(database_url) as conn:
        ids = []
        for n, age in enumerate(ages):
            row = conn.execute(
                "INSERT INTO change_feed (topic, event, payload, created_at)"
                " VALUES ('vehicles', 'vehicle.updated', %s, now() - %s) RETURNING id",
                (json.dumps({"vehicles": [delta(f"aged-{n}")]}), age),
            ).fetchone()
            assert row is not None
            ids.append(int(row[0]))
        return ids


def delta(vid: str, region: str = "eu-west", status: str = "updating") -> dict[str, Any]:
    return {
        "id": vid,
        "status": status,
        "reasonCodes": [],
        "region": region,
        "model": "atlas",
        "org": "default",
    }
