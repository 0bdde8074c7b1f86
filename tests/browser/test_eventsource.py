"""A real browser's native `EventSource` (headless chromium) against the running app: it
receives live events and, after the connection drops (the API restarts), reconnects by itself
with `Last-Event-ID` and receives what it missed, then live events again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from api.app import create_app
from core.auth import mint_dev_token
from core.settings import Settings
from devtools.localservers import free_port
from models.enums import Role
from tests.api.conftest import bearer
from tests.api.stream import delta, feed_vehicles, open_stream

GUARD = 60  # waiting longer than this for a report is a failure (not a measured time)

PAGE = """<!doctype html><html><body><pre id="log"></pre><script>
const q = new URLSearchParams(location.search);
const report = (kind, body) => fetch('/report', {method: 'POST',
  body: JSON.stringify({kind, ...body})});
const source = new EventSource(q.get('api') + '/api/v1/stream?topics=vehicles&ticket='
  + encodeURIComponent(q.get('ticket')));
source.onopen = () => report('open', {});
source.onerror = () => report('error', {state: source.readyState});
source.addEventListener('vehicle.updated', (e) =>
  report('event', {id: e.lastEventId, data: JSON.parse(e.data)}));
</script></body></html>"""


@asynccontextmanager
async def serve(app: Any, port: int) -> AsyncIterator[uvicorn.Server]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        async with asyncio.timeout(GUARD):
            await task


class ReportingPage:
    """A page served from an origin of its own whose script POSTs what it sees to `/report`
    (`{"kind": ..., ...}`): `next(kind)` waits for the next report of that kind, and `seen`
    keeps every report read so far."""

    def __init__(self, html: str) -> None:
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"

        async def page(_: Request) -> HTMLResponse:
            return HTMLResponse(html)

        async def report(request: Request) -> Response:
            await self.reports.put(json.loads(await request.body()))
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/", page), Route("/report", report, methods=["POST"])])

    async def next(self, kind: str) -> dict[str, Any]:
        while True:
            async with asyncio.timeout(GUARD):
                item = await self.reports.get()
            self.seen.append(item)
            if item["kind"] == kind:
                return item


async def open_chromium(chromium: str, profile: Any, url: str) -> asyncio.subprocess.Process:
    """Headless chromium on `url`, its renderers in its own process group (`stop` ends it)."""
    return await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(pid: int) -> None:
    """End the browser this test started: its process group (it and its helpers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def feed(database_url: str, vehicle_id: str) -> int:
    return feed_vehicles(database_url, [delta(vehicle_id)])


async def test_eventsource_receives_live_events_and_resumes_after_a_drop(
    chromium: str,
    settings: Settings,
    dev_key: str,
    database_url: str,
    tmp_path: Any,
) -> None:
    pages = ReportingPage(PAGE)
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    api_settings = settings.model_copy(update={"cors_origins": [pages.origin]})
    next_report = pages.next

    async with serve(pages.app, pages.port):
        async with serve(create_app(api_settings), api_port):
            async with httpx.AsyncClient(base_url=api, timeout=GUARD) as client:
                issued = await client.post(
                    "/api/v1/stream/tickets",
                    headers=bearer(mint_dev_token(dev_key, role=Role.VIEWER)),
                )
                assert issued.status_code == 201, issued.text
                ticket = issued.json()["data"]["ticket"]
            url = f"{pages.origin}/?api={api}&ticket={ticket}"
            browser = await open_chromium(chromium, tmp_path / "profile", url)
            try:
                await next_report("open")
                first = feed(database_url, "browser-1")
                got = await next_report("event")
                assert got["id"] == str(first)
                assert got["data"]["vehicles"][0]["id"] == "browser-1"
                # The API goes away (the stream ends with it) ...
            except BaseException:
                stop(browser.pid)
                await browser.wait()
                raise
        try:
            await next_report("error")
            # ... changes happen meanwhile ...
            missed = [feed(database_url, f"browser-{n}") for n in (2, 3)]
            # ... and the API comes back on the same address: the browser reconnects by
            # itself (same URL, the ticket still valid) with Last-Event-ID.
            async with serve(create_app(api_settings), api_port):
                await next_report("open")
                live = feed(database_url, "browser-4")
                events = [await next_report("event") for _ in range(3)]
            assert [int(e["id"]) for e in events] == [*missed, live]
            assert [e["data"]["vehicles"][0]["id"] for e in events] == [
                "browser-2",
                "browser-3",
                "browser-4",
            ]
        finally:
            stop(browser.pid)
            await browser.wait()


# The page of docs/api.md ("Tickets for browsers"): it mints its ticket itself, remembers the
# last event id, and when the stream has ended at the ticket's expiry (the browser's own retry
# with the expired ticket is refused: the source is CLOSED) mints a new ticket and opens a new
# EventSource with lastEventId=.
RENEWING_PAGE = """<!doctype html><html><body><script>
const q = new URLSearchParams(location.search);
const api = q.get('api');
const report = (kind, body) => fetch('/report', {method: 'POST',
  body: JSON.stringify({kind, ...body})});
let lastEventId = null;
let source = null;
async function connect() {
  const {data} = await (await fetch(api + '/api/v1/stream/tickets', {method: 'POST',
    headers: {Authorization: 'Bearer ' + q.get('token')}})).json();
  report('ticket', {lastEventId});
  const query = new URLSearchParams({topics: 'vehicles', ticket: data.ticket});
  if (lastEventId !== null) query.set('lastEventId', lastEventId);
  source = new EventSource(api + '/api/v1/stream?' + query);
  source.onopen = () => report('open', {});
  source.addEventListener('vehicle.updated', (e) => {
    lastEventId = e.lastEventId;
    report('event', {id: e.lastEventId, data: JSON.parse(e.data)});
  });
  source.onerror = () => {
    report('error', {state: source.readyState});
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 200);
  };
}
connect();
</script></body></html>"""


async def test_eventsource_renews_its_ticket_when_the_stream_ends_at_expiry(
    chromium: str,
    settings: Settings,
    dev_key: str,
    database_url: str,
    tmp_path: Any,
) -> None:
    """Tickets live 3 s here: each stream ends at its ticket's expiry, the browser's own retry
    is refused (401), and the page mints a new ticket and resumes with lastEventId=: every
    event arrives once, in order, across the renewals."""
    pages = ReportingPage(RENEWING_PAGE)
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    api_settings = settings.model_copy(
        update={"cors_origins": [pages.origin], "stream_ticket_seconds": 3}
    )
    next_report, seen = pages.next, pages.seen

    token = mint_dev_token(dev_key, role=Role.VIEWER)
    async with serve(pages.app, pages.port), serve(create_app(api_settings), api_port):
        async with httpx.AsyncClient(base_url=api, timeout=GUARD) as client:
            async with open_stream(client, bearer(token), topics="vehicles"):
                pass  # the stream hub is up before the page's short tickets are minted
        url = f"{pages.origin}/?api={api}&token={token}"
        browser = await open_chromium(chromium, tmp_path / "profile", url)
        try:
            await next_report("open")
            ids = [feed(database_url, "renew-1")]
            got = [await next_report("event")]
            for n in (2, 3):
                # The stream ends at the ticket's expiry; the retry is refused; a new ticket.
                renewed = await next_report("ticket")
                assert renewed["lastEventId"] == got[-1]["id"]
                ids.append(feed(database_url, f"renew-{n}"))  # written while renewing
                got.append(await next_report("event"))
            assert [int(e["id"]) for e in got] == ids
            assert [e["data"]["vehicles"][0]["id"] for e in got] == [
                "renew-1",
                "renew-2",
                "renew-3",
            ]
            assert any(r["kind"] == "error" and r["state"] == 2 for r in seen)  # CLOSED
        finally:
            stop(browser.pid)
            await browser.wait()
