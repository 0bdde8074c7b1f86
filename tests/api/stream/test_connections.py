"""Connections: keep-alive comments, a client that reads nothing, shutdown with streams
open, a client that goes away."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import httpx
import psycopg
import uvicorn
from pydantic import SecretStr

from api.app import create_app
from core.settings import Settings
from devtools.localservers import free_port
from tests.api.conftest import METRICS_TOKEN, bearer, samples, serve_app
from tests.api.stream import READ_GUARD, open_stream


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
    settings: Settings,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    metrics_auth: dict,
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
            "stream_queue_max_bytes": 1 << 30,
            "metrics_token": SecretStr(METRICS_TOKEN),
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
                async with asyncio.timeout(READ_GUARD):
                    head += await loop.sock_recv(sock, 4096)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]

            async def subscribers() -> tuple[float, float]:
                text = (await client.get("/metrics", headers=metrics_auth)).text
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
                    " 'region', 'eu-west', 'model', 'atlas', 'org', 'default',"
                    " 'status', 'updating', 'reasonCodes', '[]'::jsonb))"
                    " FROM generate_series(1, 500) m))"
                    " FROM generate_series(1, 400) n",
                    (prefix,),
                )
            for _ in range(300):
                if await subscribers() == (0, 1):
                    break
                await asyncio.sleep(0.05)
            assert await subscribers() == (0, 1)
            # What the server had written before it stopped is still readable; then the end.
            while True:
                async with asyncio.timeout(READ_GUARD):
                    if not await loop.sock_recv(sock, 1 << 20):
                        break
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
            async with asyncio.timeout(READ_GUARD):
                await task
            while (item := await sse.next()) is not None:
                assert "comment" in item
    assert not hub.subscribers
    assert hub.connections_open == 0  # the lifespan's shutdown closed them


async def test_disconnected_client_is_reclaimed(
    app_url: str, viewer: dict, metrics_auth: dict
) -> None:
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        async with open_stream(client, viewer):
            pass
    # The app of this test: its hub, reached through the served app's state.
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        for _ in range(200):
            metrics = (await client.get("/metrics", headers=metrics_auth)).text
            if (open_streams := samples(metrics, "motorcade_sse_subscribers")[""]) == 0:
                break
            await asyncio.sleep(0.05)
        assert open_streams == 0
