"""PostgreSQL restarted (and crashed) under the running system: an embedded server of the
test's own (tests/faults/pgserver.py), stopped and started again on the same data directory
and socket, never the machine's server.

- during ingest at load: every `202` is stored exactly once, clients see 503 (`UNAVAILABLE`
  or `OVERLOADED`, with `Retry-After`) and then `202` again; never a 500, never a dropped
  connection.
- mid-rollout: the API, a worker and the Temporal dev server on it; the rollout's activities
  retry, it completes, and its counters equal its targets' states.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from core.auth import generate_dev_key, mint_dev_token
from devtools.localservers import free_port, start_ingest_process, stop_process, wait_http_ready
from models.enums import Role
from services.signing import write_trusted_keys_file
from tests.conftest import migrated_database
from tests.factories import assert_stored_exactly_once, insert_vehicles
from tests.faults.cluster import Cluster, wait_until
from tests.faults.conftest import (
    SIGNING_KEY,
    create_rollout,
    fleet,
    rollout_body,
    signed_release,
)
from tests.faults.pgserver import RestartablePostgres

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def restartable() -> Iterator[RestartablePostgres]:
    server = RestartablePostgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def restartable_db(restartable: RestartablePostgres) -> Iterator[str]:
    """A migrated database on the restartable server (the server is running again after the
    test, whatever it did to it)."""
    with migrated_database(restartable.url) as url:
        yield url
        if not _answers(restartable.url):
            restartable.start()
            restartable.wait_ready()


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Gateway:
    """Clients posting telemetry as a gateway does: a batch is resent (same event ids) until it
    is acknowledged, after the `Retry-After` it was given."""

    def __init__(self, base: str, headers: dict[str, str], vids: list[str]) -> None:
        self.base = base
        self.headers = headers
        self.vids = vids
        self.seq = dict.fromkeys(vids, 0)
        self.acked: list[tuple[str, str]] = []
        self.answers: Counter[tuple[int, str]] = Counter()  # (status, error code)
        self.transport_errors: list[str] = []
        self.duplicates = 0  # events a 202 counted as already stored (a resend after a 503)
        self.bad: list[str] = []  # answers that are neither 202 nor a proper 503
        self.first_202_after: float | None = None  # monotonic time of the first 202 after
        self.mark: float | None = None  # ... this mark (set when PostgreSQL is back)
        self.stop = asyncio.Event()

    def batch(self, n: int) -> dict[str, Any]:
        events = []
        for i in range(n):
            vid = self.vids[(len(self.acked) + i) % len(self.vids)]
            self.seq[vid] += 1
            events.append(
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vid,
                    "seq": self.seq[vid],
                    "type": "apply_start",
                    "occurredAt": _now_iso(),
                }
            )
        return {"events": events}

    async def send_until_acked(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        while True:
            try:
                r = await client.post("/api/v1/telemetry", json=body, headers=self.headers)
            except httpx.HTTPError as exc:
                self.transport_errors.append(repr(exc))
                await asyncio.sleep(0.2)
                continue
            code = r.json().get("error", {}).get("code", "") if r.status_code != 202 else ""
            self.answers[(r.status_code, code)] += 1
            if r.status_code == 202:
                data = r.json()["data"]
                self.duplicates += data["duplicates"]
                if data["accepted"] + data["duplicates"] != len(body["events"]):
                    self.bad.append(f"202 that does not count every event: {data}")
                self.acked.extend((e["vehicleId"], e["eventId"]) for e in body["events"])
                if self.mark is not None and self.first_202_after is None:
                    self.first_202_after = time.monotonic()
                return
            if r.status_code != 503 or code not in ("UNAVAILABLE", "OVERLOADED"):
                self.bad.append(f"{r.status_code} {r.text[:300]}")
                return
            retry_after = r.headers.get("Retry-After")
            if retry_after is None or not retry_after.isdigit():
                self.bad.append(f"503 without a Retry-After: {r.headers}")
                return
            # A real gateway waits Retry-After seconds; capped so the test stays short.
            await asyncio.sleep(min(int(retry_after), 0.5))

    async def client(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                await self.send_until_acked(client, self.batch(50))


async def test_postgres_restarted_during_ingest_loses_nothing(
    restartable: RestartablePostgres, restartable_db: str, dev_key: str
) -> None:
    prefix = f"PGR{uuid.uuid4().hex[:5]}-"
    vids = [f"{prefix}{i:03d}" for i in range(100)]
    insert_vehicles(restartable_db, vids, release="1.0")
    gateway = Gateway(
        "", {"Authorization": f"Bearer {mint_dev_token(dev_key, role=Role.GATEWAY)}"}, vids
    )
    port = free_port()
    gateway.base = f"http://127.0.0.1:{port}"
    proc = start_ingest_process(restartable_db, dev_key, port, quiet=True)
    figures: dict[str, Any] = {}
    try:
        await wait_http_ready(gateway.base, path="/healthz")
        clients = [asyncio.create_task(gateway.client()) for _ in range(6)]
        # A restart (clean shutdown, then start), then a crash (no checkpoint: recovery).
        for mode in ("fast", "immediate"):
            await asyncio.sleep(1.5)
            before = len(gateway.acked)
            outage = Counter(gateway.answers)
            await asyncio.to_thread(restartable.stop, mode=mode)
            await asyncio.sleep(2.0)  # clients keep sending while PostgreSQL is down
            gateway.first_202_after = None
            await asyncio.to_thread(restartable.start)
            gateway.mark = started = time.monotonic()
            for _ in range(300):
                if gateway.first_202_after is not None:
                    break
                await asyncio.sleep(0.1)
            assert gateway.first_202_after is not None, "ingest did not recover"
            unavailable = sum(
                n for (status, _), n in (gateway.answers - outage).items() if status == 503
            )
            figures[mode] = {
                "acked_before": before,
                "503s": unavailable,
                "first_202_s": round(gateway.first_202_after - started, 2),
            }
            assert gateway.bad == [], gateway.bad  # only 202 and 503 with Retry-After
            assert unavailable >= 1, f"{mode}: no client met the outage"
            gateway.mark = None
        await asyncio.sleep(1.0)
        after = len(gateway.acked)
        await asyncio.sleep(1.0)
        assert len(gateway.acked) > after, "no traffic after the recovery"
        gateway.stop.set()
        await asyncio.gather(*clients)
    finally:
        gateway.stop.set()
        stop_process(proc, timeout=10)
    print(
        f"\npostgres restart during ingest: {figures}, answers {dict(gateway.answers)},"
        f" duplicates {gateway.duplicates}"
    )
    assert gateway.bad == []  # only 202 and 503 UNAVAILABLE/OVERLOADED with Retry-After
    assert gateway.transport_errors == []  # the ingest process kept answering throughout
    assert not any(status >= 500 and status != 503 for status, _ in gateway.answers)
    assert_stored_exactly_once(restartable_db, prefix, gateway.acked)


# --- mid-rollout ------------------------------------------------------------------------------

FLEET = 300
CANARY = 10
REGION = "faults-pg"
COUNTERS = ("targeted", "notified", "updating", "succeeded", "failed", "blocked")


def _counters_drift(db: str, rollout_id: int) -> dict[str, tuple[int, int]]:
    """The rollout's counters that differ from a count of its targets by state (one
    statement: one snapshot), as {counter: (column, count)}."""
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT r.targeted, r.notified, r.updating, r.succeeded, r.failed, r.blocked,"
            " t.targeted, t.notified, t.updating, t.succeeded, t.failed, t.blocked"
            " FROM rollouts r, LATERAL (SELECT count(*) AS targeted,"
            "   count(*) FILTER (WHERE state NOT IN ('planned', 'skipped')) AS notified,"
            "   count(*) FILTER (WHERE state = 'updating') AS updating,"
            "   count(*) FILTER (WHERE state = 'succeeded') AS succeeded,"
            "   count(*) FILTER (WHERE state = 'failed') AS failed,"
            "   count(*) FILTER (WHERE state = 'blocked') AS blocked"
            "   FROM rollout_targets WHERE rollout_id = r.id) t"
            " WHERE r.id = %s",
            (rollout_id,),
        ).fetchone()
    assert row is not None
    n = len(COUNTERS)
    return {c: (row[i], row[n + i]) for i, c in enumerate(COUNTERS) if row[i] != row[n + i]}


class Fleet:
    """The test acting as the vehicles (through the ingest process, one gateway token): a
    `ready` for every target its rollout notified, resent after a 503 until acknowledged."""

    def __init__(self, cluster: Cluster, rollout_id: int) -> None:
        self.cluster = cluster
        self.rollout_id = rollout_id
        self.headers = cluster.token(Role.GATEWAY, "fault-gateway")
        self.answered: set[str] = set()
        self.answers: Counter[int] = Counter()
        self.release = ""

    def notified(self) -> list[tuple[str, str]]:
        try:
            rows = self.cluster.sql(
                "SELECT vehicle_id, desired_state_id::text FROM rollout_targets"
                " WHERE rollout_id = %s AND state = 'notified' ORDER BY vehicle_id",
                (self.rollout_id,),
            )
        except psycopg.OperationalError:
            return []  # PostgreSQL is down: the vehicles look again later
        return [(vid, ds) for vid, ds in rows if vid not in self.answered]

    def answer(self, ingest: httpx.Client) -> None:
        todo = self.notified()
        if not todo:
            return
        events = [
            {
                "eventId": str(uuid.uuid4()),
                "vehicleId": vid,
                "seq": 1,
                "type": "ready",
                "occurredAt": _now_iso(),
                "desiredStateId": ds,
                "releaseVersion": self.release,
            }
            for vid, ds in todo
        ]
        while True:  # the same events until acknowledged (duplicates are harmless)
            try:
                r = ingest.post("/api/v1/telemetry", json={"events": events}, headers=self.headers)
            except httpx.HTTPError:
                self.answers[0] += 1
                time.sleep(0.2)
                continue
            self.answers[r.status_code] += 1
            if r.status_code == 202:
                self.answered.update(vid for vid, _ in todo)
                return
            assert r.status_code == 503, r.text
            assert r.headers.get("Retry-After"), r.headers
            time.sleep(0.5)


def test_postgres_restarted_mid_rollout_the_rollout_completes_and_counts_hold(
    restartable: RestartablePostgres, restartable_db: str, tmp_path: Path
) -> None:
    keys = tmp_path / "trusted-keys.json"
    write_trusted_keys_file(keys, [SIGNING_KEY.public_key()])
    cluster = Cluster(
        tmp=tmp_path,
        database_url=restartable_db,
        dev_key=generate_dev_key(),
        trusted_keys_file=keys,
    )
    api_answers: Counter[tuple[int, str]] = Counter()
    figures: dict[str, Any] = {}
    try:
        cluster.start_temporal()
        cluster.add_api()
        cluster.add_ingest()
        cluster.add_worker()
        for name in ("api", "ingest", "worker"):
            cluster.start(name)
        release = signed_release(cluster)
        fleet(cluster, "FP", FLEET, REGION)
        body = rollout_body(
            REGION,
            release=release,
            canary=CANARY,
            canary_bake=2,
            waves=[{"percent": 50, "bakeSeconds": 2}, {"percent": 100, "bakeSeconds": 1}],
        )
        with cluster.client("api") as api, cluster.client("ingest") as ingest:
            created = create_rollout(api, cluster, body)
            assert created.status_code == 201, created.text
            rid = int(created.json()["data"]["id"])
            vehicles = Fleet(cluster, rid)
            vehicles.release = release
            viewer = cluster.token(Role.VIEWER)

            def look() -> dict[str, Any] | None:
                try:
                    r = api.get(f"/api/v1/rollouts/{rid}", headers=viewer)
                except httpx.HTTPError:
                    api_answers[(0, "transport")] += 1
                    return None
                code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                api_answers[(r.status_code, code)] += 1
                return dict(r.json()["data"]) if r.status_code == 200 else None

            # The canary is notified and answers; the restart lands while it bakes and the
            # next stage is issued.
            wait_until(lambda: vehicles.notified(), within=60, what="the canary notified")
            vehicles.answer(ingest)
            wait_until(
                lambda: (look() or {}).get("progress", {}).get("succeeded", 0) >= CANARY,
                within=60,
                what="the canary succeeded",
            )
            assert _counters_drift(restartable_db, rid) == {}
            restartable.stop(mode="fast")
            down_at = time.monotonic()
            while time.monotonic() - down_at < 5:  # the outage: the API answers meanwhile
                look()
                time.sleep(0.25)
            restartable.start()
            back_at = time.monotonic()
            samples = 0

            def progressed() -> dict[str, Any] | None:
                nonlocal samples
                vehicles.answer(ingest)
                drift = _counters_drift(restartable_db, rid)
                samples += 1
                assert drift == {}, f"counters differ from the targets: {drift}"
                current = look()
                if current is not None and current["status"] in TERMINAL:
                    return current
                return None

            final = wait_until(progressed, within=180, every=0.5, what="the rollout ends")
            figures["completed_after_restart_s"] = round(time.monotonic() - back_at, 1)
        failed_activities = cluster["worker"].log.read_text().count("Completing activity as failed")
        figures["failed_activity_attempts"] = failed_activities
    finally:
        cluster.close()
    print(
        f"\npostgres restart mid-rollout: {figures}, API answers {dict(api_answers)},"
        f" telemetry answers {dict(vehicles.answers)}, counter checks {samples}"
    )
    assert final["status"] == "completed", (final, cluster.logs())
    assert final["progress"]["succeeded"] == FLEET, final["progress"]
    assert _counters_drift(restartable_db, rid) == {}
    by_state = cluster.sql(
        "SELECT state, attempt, count(*) FROM rollout_targets WHERE rollout_id = %s GROUP BY 1, 2",
        (rid,),
    )
    assert by_state == [("succeeded", 1, FLEET)], by_state  # every vehicle notified once
    # The API answered every read during the outage: 200 or 503 UNAVAILABLE, never a 500.
    assert {s for s, _ in api_answers} <= {200, 503}, api_answers
    assert all(code == "UNAVAILABLE" for s, code in api_answers if s == 503), api_answers
    assert api_answers[(503, "UNAVAILABLE")] >= 1, api_answers
    assert set(vehicles.answers) <= {202, 503}, vehicles.answers
    # The outage reached the worker: activities failed, were retried, and the rollout went on.
    assert failed_activities >= 1, cluster["worker"].tail()


TERMINAL = {"completed", "aborted", "rolled_back", "failed"}
