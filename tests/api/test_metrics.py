"""Prometheus metrics: the API's `/metrics` (requests by route template, rollouts by status)
and the worker's endpoint (the Temporal SDK's metrics and the gate evaluations), scraped over
HTTP from real processes' servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE, connect
from devtools.localservers import free_port
from models.enums import RolloutStatus
from tests.api.conftest import samples, serve_app
from tests.api.test_envelopes import assert_error
from tests.api.test_rollout_control import create_rollout, wait_for_status
from tests.factories import Sessions
from worker.main import build_worker


async def test_requests_are_counted_by_route_template_never_by_path(
    http: httpx.AsyncClient, viewer: dict, metrics_auth: dict, prefix: str
) -> None:
    missing = await http.get(f"/api/v1/vehicles/{prefix}nope", headers=viewer)
    assert missing.status_code == 404
    text = (await http.get("/metrics", headers=metrics_auth)).text
    counted = samples(text, "motorcade_http_requests_total")
    assert any('route="/vehicles/{vehicle_id}"' in k and 'status="404"' in k for k in counted), [
        k for k in counted if "vehicles" in k
    ]
    assert not any(prefix in k for k in counted), "an id became a label"
    latency = samples(text, "motorcade_http_request_duration_seconds_count")
    assert any('route="/vehicles/{vehicle_id}"' in k for k in latency)


async def test_metrics_take_the_operators_secret_never_a_user_token(
    http: httpx.AsyncClient, viewer: dict, operator: dict, metrics_auth: dict
) -> None:
    """/metrics counts the whole fleet (rollouts by status, requests): no JWT reads it, a
    viewer's included; only the secret in MOTORCADE_METRICS_TOKEN, compared in full."""
    secret = metrics_auth["Authorization"].removeprefix("Bearer ")
    every: list[dict[str, Any]] = [
        {},
        viewer,
        operator,
        {"Authorization": f"Bearer {secret[:-1]}"},
        {"Authorization": f"Bearer {secret}x"},
        {"Authorization": f"Basic {secret}"},
        {"Authorization": "Bearer ²".encode()},  # not ASCII: 401, never a 500
    ]
    for headers in every:
        body = assert_error(await http.get("/metrics", headers=headers), 401, "UNAUTHENTICATED")
        assert "MOTORCADE_METRICS_TOKEN" in body["error"]["message"]
    response = await http.get("/metrics", headers=metrics_auth)
    assert response.status_code == 200
    assert "motorcade_rollouts" in response.text


async def test_metrics_are_off_without_a_secret(api_settings: Settings, viewer: dict) -> None:
    off = api_settings.model_copy(update={"metrics_token": None})
    async with serve_app(off) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert_error(await client.get("/metrics", headers=viewer), 404, "NOT_FOUND")


async def test_rollouts_by_status_match_the_table(
    http: httpx.AsyncClient, metrics_auth: dict, database_url: str
) -> None:
    text = (await http.get("/metrics", headers=metrics_auth)).text
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM rollouts GROUP BY status").fetchall()
    table = {str(status): int(n) for status, n in rows}
    gauge = samples(text, "motorcade_rollouts")
    assert set(gauge) == {f'{{status="{s.value}"}}' for s in RolloutStatus}
    for status in RolloutStatus:
        assert gauge[f'{{status="{status.value}"}}'] == table.get(status.value, 0)


@pytest.fixture
async def metered_worker(api_settings: Settings, sessions: Sessions) -> AsyncIterator[str]:
    """A worker whose client serves the SDK's metrics (as MOTORCADE_WORKER_METRICS_ADDRESS
    makes `motorcade worker` do); yields the metrics URL."""
    address = f"127.0.0.1:{free_port()}"
    client = await connect(api_settings.temporal_address, metrics_address=address)
    async with build_worker(client, sessions, task_queue=ROLLOUT_TASK_QUEUE):
        yield f"http://{address}/metrics"


async def test_the_worker_serves_sdk_metrics_and_gate_evaluations(
    metered_worker: str,
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    await wait_for_status(http, viewer, rid, "running")
    async with httpx.AsyncClient(timeout=10) as scraper:
        for _ in range(100):  # the canary bakes: its gates are evaluated (and wait)
            text = (await scraper.get(metered_worker)).text
            gates = samples(text, "motorcade_gate_evaluations_total") or samples(
                text, "motorcade_gate_evaluations"
            )
            if any('stage="canary"' in k for k in gates):
                break
            await asyncio.sleep(0.2)
    assert any('stage="canary"' in k and 'action="wait"' in k for k in gates), text[-2000:]
    assert "temporal_activity_execution_latency" in text or "temporal_request" in text
    assert "temporal_workflow_task_execution_latency" in text or "temporal_worker_" in text


@pytest.mark.parametrize(
    ("path", "route", "role"),
    [("/api/v1/rollouts", "/rollouts", "operator"), ("/api/v1/telemetry", "/telemetry", "gateway")],
)
async def test_a_client_gone_mid_body_is_counted_499_never_a_500(
    api_settings: Settings,
    token: Callable[..., str],
    metrics_auth: dict,
    path: str,
    route: str,
    role: str,
) -> None:
    """A client that hangs up before its body arrived (a device losing its network, a
    balancer's timeout) is no server error: it is counted and logged as 499 (nginx's "client
    closed request"), so a 5xx alert never fires for it and nothing is sent to nobody."""
    async with serve_app(api_settings) as base, httpx.AsyncClient(base_url=base) as http:

        async def counts() -> dict[str, float]:
            text = (await http.get("/metrics", headers=metrics_auth)).text
            return {
                k: v
                for k, v in samples(text, "motorcade_http_requests_total").items()
                if 'method="POST"' in k and f'route="{route}"' in k
            }

        before = await counts()
        host, port = base.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: motorcade\r\n"
            f"Authorization: Bearer {token(role)}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"events": [')
        await writer.drain()
        await asyncio.sleep(0.3)  # the route is reading the body
        writer.close()
        await writer.wait_closed()
        moved: dict[str, float] = {}
        for _ in range(100):
            after = await counts()
            moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            if moved:
                break
            await asyncio.sleep(0.1)
    assert moved == {f'{{method="POST",route="{route}",status="499"}}': 1.0}, moved
