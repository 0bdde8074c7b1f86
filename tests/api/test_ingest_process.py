"""`motorcade ingest` as its own process (or several sharing the port): killed abruptly
(SIGKILL) while clients send, then restarted; every event it acknowledged (202) is in
PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from devtools.localservers import free_port, start_ingest_process, stop_process, wait_http_ready
from tests.api.conftest import bearer
from tests.api.telemetry import now_iso
from tests.factories import assert_stored_exactly_once, insert_vehicles

pytestmark = pytest.mark.slow


def start_ingest(
    database_url: str, dev_key: str, port: int, processes: int = 1
) -> subprocess.Popen[bytes]:
    return start_ingest_process(database_url, dev_key, port, processes=processes, quiet=True)


@pytest.mark.parametrize("processes", [1, 2])
async def test_every_acknowledged_event_survives_a_kill(
    database_url: str, dev_key: str, token: Callable[..., str], prefix: str, processes: int
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

    proc = start_ingest(database_url, dev_key, port, processes)
    try:
        await wait_http_ready(base)
        clients = [asyncio.create_task(client_loop()) for _ in range(4)]
        await asyncio.sleep(1.5)
        before_kill = len(acked)
        os.killpg(proc.pid, signal.SIGKILL)  # every process of it, at once
        proc.wait(timeout=10)
        await asyncio.sleep(0.5)  # clients keep sending into the void
        proc = start_ingest(database_url, dev_key, port, processes)
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
        stop_process(proc, timeout=10)
    assert_stored_exactly_once(database_url, prefix, acked)


async def test_processes_share_the_port_and_stop_with_their_parent(
    database_url: str, dev_key: str, token: Callable[..., str], prefix: str
) -> None:
    """`--processes 2`: both processes answer on the one port (each has its own group
    committer), SIGTERM stops them all, and a supervisor killed outright takes its
    children with it (no orphan keeps the port)."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    gateway = bearer(token("gateway"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_ingest(database_url, dev_key, port, processes=2)
    try:
        await wait_http_ready(base)
        children = {int(p) for p in _children(proc.pid)}
        assert len(children) == 2
        answered_by: set[int] = set()
        for _ in range(40):  # new connections, spread by the kernel over both processes
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                beat = {"vehicleId": vid, "sentAt": now_iso(), "batteryPercent": 50}
                r = await client.post(
                    "/api/v1/telemetry", json={"heartbeats": [beat]}, headers=gateway
                )
                assert r.status_code == 202
                answered_by.update(_connected_pids(port) & children)
        assert answered_by == children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not any(_alive(pid) for pid in children)
        # Again, and now the supervisor is killed outright: the children follow it.
        proc = start_ingest(database_url, dev_key, port, processes=2)
        await wait_http_ready(base)
        children = {int(p) for p in _children(proc.pid)}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for _ in range(100):
            if not any(_alive(pid) for pid in children):
                break
            await asyncio.sleep(0.1)
        assert not any(_alive(pid) for pid in children)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [p for p in f.read().split() if "spawn_main" in _cmdline(int(p))]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _connected_pids(port: int) -> set[int]:
    """The processes holding an established connection on `port` right now (from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                    inodes.add(cols[9])
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        pids.add(int(pid))
    return pids


async def test_a_request_postgresql_refuses_fails_alone_in_the_process(
    own_database: str,
    dev_key: str,
    token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """`motorcade ingest` as a process (the API's ingestor, services/ingest.py): a request
    PostgreSQL refuses (a CHECK constraint validation cannot know of) among good ones sent
    together, in one group (it waits 300 ms for them): only it fails, 422; the good ones are
    202 and stored. Its log says so once, with the SQLSTATE and never the value."""
    monkeypatch.setenv("MOTORCADE_INGEST_GROUP_WAIT_MS", "300")
    vids = [f"good-{i}" for i in range(8)]
    insert_vehicles(own_database, [*vids, "poisoned"], release="1.0")
    with psycopg.connect(own_database) as conn:
        conn.execute(
            "ALTER TABLE timeline_events ADD CONSTRAINT no_poison"
            " CHECK (reason_code IS DISTINCT FROM 'POISON')"
        )
    gateway = bearer(token("gateway"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_ingest_process(own_database, dev_key, port, quiet=False)

    def body(vid: str, **kw: Any) -> dict[str, Any]:
        kind, reason = kw.get("kind", "apply_start"), kw.get("reason")
        return {
            "events": [
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vid,
                    "seq": 1,
                    "type": kind,
                    "occurredAt": now_iso(),
                    "reasonCode": reason,
                }
            ]
        }

    bodies = [*map(body, vids[:4]), body("poisoned", kind="failed", reason="POISON")]
    bodies += map(body, vids[4:])
    try:
        await wait_http_ready(base)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            answers = await asyncio.gather(
                *(client.post("/api/v1/telemetry", json=b, headers=gateway) for b in bodies)
            )
    finally:
        stop_process(proc, timeout=10)
    codes = [r.status_code for r in answers]
    assert codes == [202] * 4 + [422] + [202] * 4, [r.text for r in answers]
    assert answers[4].json()["error"]["code"] == "VALIDATION_ERROR"
    with psycopg.connect(own_database) as conn:
        stored = conn.execute(
            "SELECT vehicle_id FROM timeline_events ORDER BY vehicle_id"
        ).fetchall()
    assert [s[0] for s in stored] == sorted(vids)
    logged = capfd.readouterr()
    lines = [json.loads(line) for line in (logged.out + logged.err).splitlines() if '{"' in line]
    split = [line for line in lines if line.get("event", "").startswith("telemetry group failed")]
    refused = [line for line in lines if line.get("event", "").startswith("telemetry request")]
    assert [(s["requests"], s["sqlstate"]) for s in split] == [(9, "23514")], lines
    assert [(r["event"], r["sqlstate"]) for r in refused] == [
        ("telemetry request refused by PostgreSQL", "23514")
    ]
    assert "POISON" not in logged.out + logged.err
