"""`motorcade ingest` as its own process: killed abruptly (SIGKILL) while clients send, then
restarted; every event it acknowledged (202) is in PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from core.localservers import free_port, wait_http_ready
from tests.api.conftest import bearer, insert_vehicles
from tests.api.test_telemetry import now_iso

pytestmark = pytest.mark.slow


def start_ingest(database_url: str, dev_key: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MOTORCADE_DATABASE_URL": database_url,
        "MOTORCADE_DEV_KEY": dev_key,
        "MOTORCADE_ENV": "test",
        "MOTORCADE_LOG_LEVEL": "WARNING",
        "MOTORCADE_LOG_FORMAT": "console",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "core.cli", "ingest", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_every_acknowledged_event_survives_a_kill(
    database_url: str, dev_key: str, token: Callable[..., str], prefix: str
) -> None:
    vids = [f"{prefix}{i:02d}" for i in range(20)]
    insert_vehicles(database_url, vids, release="1.0")
    gateway = bearer(token("gateway"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    acked: list[tuple[str, str]] = []
    unacked: list[dict[str, Any]] = []
    seq = dict.fromkeys(vids, 0)
    stop = asyncio.Event()

    def batch(n: int) -> dict[str, Any]:
        events = []
        for i in range(n):
            vid = vids[i % len(vids)]
            seq[vid] += 1
            events.append(
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vid,
                    "seq": seq[vid],
                    "type": "apply_start",
                    "occurredAt": now_iso(),
                }
            )
        return {"events": events}

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            while not stop.is_set():
                body = batch(50)
                try:
                    r = await client.post("/api/v1/telemetry", json=body, headers=gateway)
                except httpx.HTTPError:
                    unacked.append(body)
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code == 202:
                    acked.extend((e["vehicleId"], e["eventId"]) for e in body["events"])
                else:
                    unacked.append(body)

    proc = start_ingest(database_url, dev_key, port)
    try:
        await wait_http_ready(base)
        clients = [asyncio.create_task(client_loop()) for _ in range(4)]
        await asyncio.sleep(1.5)
        before_kill = len(acked)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await asyncio.sleep(0.5)  # clients keep sending into the void
        proc = start_ingest(database_url, dev_key, port)
        await wait_http_ready(base)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
        assert before_kill > 0 and len(acked) > before_kill, "no traffic on both sides"
        assert unacked, "the kill cut no request short"
        # Clients resend what was not acknowledged: nothing is stored twice.
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for body in unacked:
                r = await client.post("/api/v1/telemetry", json=body, headers=gateway)
                assert r.status_code == 202
                data = r.json()["data"]
                assert data["accepted"] + data["duplicates"] == len(body["events"])
                acked.extend((e["vehicleId"], e["eventId"]) for e in body["events"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT (te.vehicle_id, te.event_id))"
            " FROM unnest(%s::text[], %s::uuid[]) AS a(vid, eid)"
            " JOIN timeline_events te ON te.vehicle_id = a.vid AND te.event_id = a.eid",
            ([a[0] for a in acked], [a[1] for a in acked]),
        ).fetchone()
        total = conn.execute(
            "SELECT count(*) FROM timeline_events WHERE vehicle_id LIKE %s", (prefix + "%",)
        ).fetchone()
    assert rows == (len(acked), len(acked))  # every acknowledged event, exactly once
    assert total == (len(acked),)  # and nothing else
