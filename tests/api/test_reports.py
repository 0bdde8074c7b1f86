"""GET /reports/reconcile and /reports/health: envelope, camelCase, roles and scope."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from core.db import session_scope
from services import reconcile as svc
from tests.api.conftest import bearer
from tests.factories import Sessions, add_vehicles, unique_prefix


async def test_reports_are_enveloped_camel_case_and_scoped(
    http: httpx.AsyncClient,
    viewer: dict[str, str],
    token: Callable[..., str],
    sessions: Sessions,
) -> None:
    prefix = unique_prefix("api")
    seen = datetime.now(UTC)
    async with session_scope(sessions) as session:
        conn = await session.connection()
        await add_vehicles(
            conn,
            prefix=prefix,
            tag="A",
            count=4,
            last_seen_at=seen,
            desired="2026.9.9",
            status="failed",
            reason_codes=["APPLY_FAILED"],
        )
        await add_vehicles(
            conn,
            prefix=prefix,
            tag="B",
            count=2,
            last_seen_at=seen,
            desired="2026.9.9",
            status="pending",
            region="r2",
        )
        await add_vehicles(conn, prefix=prefix, tag="C", count=1, last_seen_at=seen)
    async with session_scope(sessions) as session:
        run = await svc.record_drift(session, run_key=f"api-test-{prefix}", marked_offline=2)

    scoped = bearer(token("viewer", scopes={"regions": [prefix + "r1"]}))
    response = await http.get("/api/v1/reports/reconcile", headers=scoped)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"data", "metadata", "timestamp"}
    data = body["data"]
    assert data["latest"]["id"] == run.run_id and data["latest"]["runKey"] == run.run_key
    assert data["latest"]["drifted"] == 4 and data["latest"]["markedOffline"] is None
    assert data["drift"] == [
        {
            "desiredReleaseVersion": "2026.9.9",
            "actualReleaseVersion": "2026.1.0",
            "status": "failed",
            "region": prefix + "r1",
            "model": prefix + "m1",
            "org": "default",
            "vehicles": 4,
        }
    ]
    assert data["driftTruncated"] is False and data["recentRuns"][0]["id"] == run.run_id

    full = (await http.get("/api/v1/reports/reconcile", headers=viewer)).json()["data"]
    assert full["latest"]["id"] == run.run_id and full["latest"]["markedOffline"] == 2
    mine = [d for d in full["drift"] if d["model"] == prefix + "m1"]
    assert sorted(d["vehicles"] for d in mine) == [2, 4]

    by_model = bearer(token("viewer", scopes={"models": [prefix + "m1"]}))
    health = await http.get("/api/v1/reports/health", headers=by_model)
    assert health.status_code == 200, health.text
    h = health.json()["data"]
    assert h["total"] == 7 and h["offline"] == 0
    assert h["byStatus"]["failed"] == 4 and h["byStatus"]["pending"] == 2
    assert h["byStatus"]["in_sync"] == 1
    assert h["topReasonCodes"] == [{"reasonCode": "APPLY_FAILED", "vehicles": 4}]


async def test_reports_need_a_reading_role(
    http: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    for path in ("/api/v1/reports/reconcile", "/api/v1/reports/health"):
        assert (await http.get(path)).status_code == 401
        device = bearer(token("device", vehicle_id="VIN-1"))
        response = await http.get(path, headers=device)
        assert response.status_code == 403 and response.json()["error"]["code"] == "FORBIDDEN"
