"""POST /rollouts/{id}/pause|resume|rollback|abort through the workflow's `control` Update,
on the dev server with a real worker; GET /rollouts/{id}/vehicles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.settings import Settings
from devtools.localservers import free_port
from tests.api.conftest import bearer, serve_app
from tests.api.test_envelopes import assert_error
from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import insert_signed_release, insert_vehicles


async def create_rollout(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    key: Ed25519PrivateKey,
    prefix: str,
    n: int = 4,
    **overrides: Any,
) -> int:
    release = f"{prefix}2027.1.0"
    insert_signed_release(database_url, key, release)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    insert_vehicles(database_url, ids, battery_percent=90)
    overrides.setdefault(
        "strategy",
        {"canary": {"size": 1, "bakeSeconds": 3600}, "waves": [{"percent": 100, "bakeSeconds": 0}]},
    )
    body = rollout_body(release, targets={"vehicleIds": ids}, **overrides)
    response = await http.post("/api/v1/rollouts", headers=operator, json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["data"]["id"])


async def wait_for_status(
    http: httpx.AsyncClient, viewer: dict, rid: int, status: str, within: float = 20
) -> dict:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        data = (await http.get(f"/api/v1/rollouts/{rid}", headers=viewer)).json()["data"]
        if data["status"] == status:
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"rollout {rid} is {data['status']}, not {status}")
        await asyncio.sleep(0.2)


async def wait_for_stages(
    http: httpx.AsyncClient, viewer: dict, rid: int, within: float = 60
) -> dict:
    """The rollout once its targets are counted (`stages` planned); it is `running` from just
    before that. `within` is a guard for a loaded machine, not a measured time."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        data = (await http.get(f"/api/v1/rollouts/{rid}", headers=viewer)).json()["data"]
        if data["stages"]:
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"rollout {rid} has no stages yet: {data}")
        await asyncio.sleep(0.2)


def audit_rows(database_url: str, rid: int, action: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT actor, role, source, reason, correlation_id, result FROM audit_log"
            " WHERE target_type = 'rollout' AND target_id = %s AND action = %s ORDER BY id",
            (str(rid), action),
        ).fetchall()


async def test_control_a_running_rollout(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    rollout_worker: None,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    await wait_for_status(http, viewer, rid, "running")
    # Its stages as planned from its 4 targets once they are counted: a canary of 1, then
    # the rest.
    running = await wait_for_stages(http, viewer, rid)
    assert running["stageCount"] == 2
    assert [(s["name"], s["vehicles"], s["bakeSeconds"]) for s in running["stages"]] == [
        ("canary", 1, 3600),
        ("wave-1", 3, 0),
    ]

    # Resume of a rollout that is not paused: refused by the Update's validator.
    refused = await http.post(
        f"/api/v1/rollouts/{rid}/resume", headers=operator, json={"reason": "too early"}
    )
    assert_error(refused, 409, "INVALID_STATE_TRANSITION")
    assert audit_rows(database_url, rid, "rollout.resume_rejected")[-1][-1] == "rejected"

    paused = await http.post(
        f"/api/v1/rollouts/{rid}/pause",
        headers={**operator, "X-Request-ID": f"pause-{prefix}"},
        json={"reason": "investigating telemetry"},
    )
    assert paused.status_code == 202, paused.text
    data = paused.json()["data"]
    assert data["control"]["action"] == "pause" and data["control"]["paused"] is True
    assert data["rollout"]["id"] == rid
    assert audit_rows(database_url, rid, "rollout.pause_requested") == [
        ("dev-operator", "operator", "api", "investigating telemetry", f"pause-{prefix}", "ok")
    ]
    await wait_for_status(http, viewer, rid, "paused")

    resumed = await http.post(
        f"/api/v1/rollouts/{rid}/resume", headers=operator, json={"reason": "all clear"}
    )
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["data"]["control"]["paused"] is False
    await wait_for_status(http, viewer, rid, "running")

    aborted = await http.post(
        f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "wrong release"}
    )
    assert aborted.status_code == 202, aborted.text
    await wait_for_status(http, viewer, rid, "aborted")
    # Each accepted action is audited once, by the API: its Update carried the marker of the
    # API's entry, so the workflow wrote none of its own (each in the status's transaction).
    for done in ("rollout.paused", "rollout.resumed", "rollout.aborted"):
        assert audit_rows(database_url, rid, done) == []
    # The resume its validator refused is audited by the API alone.
    assert audit_rows(database_url, rid, "rollout.resume_refused") == []

    # Finished: refused at once, and the refusal is on record.
    again = await http.post(
        f"/api/v1/rollouts/{rid}/pause", headers=operator, json={"reason": "late"}
    )
    body = assert_error(again, 409, "INVALID_STATE_TRANSITION")
    assert "aborted" in body["error"]["message"]


async def test_control_of_a_finished_rollout_is_refused_at_once(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rid,))
    for action in ("pause", "resume", "rollback", "abort"):
        response = await http.post(
            f"/api/v1/rollouts/{rid}/{action}",
            headers={**operator, "X-Request-ID": f"{action}-{prefix}"},
            json={"reason": "testing"},
        )
        body = assert_error(response, 409, "INVALID_STATE_TRANSITION")
        assert "completed" in body["error"]["message"]
        assert audit_rows(database_url, rid, f"rollout.{action}_rejected") == [
            ("dev-operator", "operator", "api", "testing", f"{action}-{prefix}", "rejected")
        ]
        assert audit_rows(database_url, rid, f"rollout.{action}_requested") == []


async def test_control_validation_roles_and_scope(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    url = f"/api/v1/rollouts/{rid}/pause"
    body = assert_error(await http.post(url, headers=operator, json={}), 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "reason"
    assert_error(
        await http.post(url, headers=operator, json={"reason": "   "}), 422, "VALIDATION_ERROR"
    )
    forced = await http.post(url, headers=operator, json={"reason": "x", "force": True})
    assert assert_error(forced, 422, "VALIDATION_ERROR")["error"]["details"][0]["field"] == "force"
    assert_error(await http.post(url, headers=viewer, json={"reason": "x"}), 403, "FORBIDDEN")
    scoped = bearer(token("operator", scopes={"regions": ["us-east"]}))
    assert_error(await http.post(url, headers=scoped, json={"reason": "x"}), 404, "NOT_FOUND")
    assert_error(
        await http.post("/api/v1/rollouts/999999999/pause", headers=operator, json={"reason": "x"}),
        404,
        "NOT_FOUND",
    )
    with psycopg.connect(database_url) as conn:
        entries = conn.execute(
            "SELECT count(*) FROM audit_log WHERE target_id = %s AND action LIKE 'rollout.pause%%'",
            (str(rid),),
        ).fetchone()
    assert entries == (0,)


async def test_rollout_vehicles_pages_and_filters(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix, n=7)
    ids = [f"{prefix}{i:03d}" for i in range(7)]
    with psycopg.connect(database_url) as conn:
        # The targets as the workflow's expansion writes them (stage 0 canary, 1 wave-1).
        conn.cursor().executemany(
            "INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state, attempt,"
            " reason_code) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (
                    rid,
                    vid,
                    0 if i == 0 else 1,
                    i,
                    "failed" if i == 3 else ("notified" if i < 4 else "planned"),
                    1 if i < 4 else 0,
                    "APPLY_FAILED" if i == 3 else None,
                )
                for i, vid in enumerate(ids)
            ],
        )
    url = f"/api/v1/rollouts/{rid}/vehicles"
    seen: list[dict] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get(url, headers=viewer, params=params)).json()
        seen.extend(page["data"])
        cursor = page["metadata"]["nextCursor"]
        assert page["metadata"]["hasMore"] is (cursor is not None)
        if cursor is None:
            break
    assert [v["vehicleId"] for v in seen] == ids
    first = seen[0]
    assert first["stage"] == "canary" and first["stageIndex"] == 0
    assert first["model"] == "atlas" and first["region"] == "eu-west"
    assert first["vehicleStatus"] == "in_sync" and first["attempt"] == 1
    failed = seen[3]
    assert (failed["state"], failed["reasonCode"], failed["stage"]) == (
        "failed",
        "APPLY_FAILED",
        "wave-1",
    )

    notified = (await http.get(url, headers=viewer, params={"state": "notified"})).json()
    assert [v["vehicleId"] for v in notified["data"]] == ids[:3]
    mixed = await http.get(url, headers=viewer, params={"state": "failed,planned"})
    assert [v["vehicleId"] for v in mixed.json()["data"]] == ids[3:]
    canary = (await http.get(url, headers=viewer, params={"stage": "canary"})).json()
    assert [v["vehicleId"] for v in canary["data"]] == ids[:1]

    assert_error(
        await http.get(url, headers=viewer, params={"state": "bogus"}), 422, "VALIDATION_ERROR"
    )
    assert_error(
        await http.get(url, headers=viewer, params={"stage": "wave-9"}), 422, "VALIDATION_ERROR"
    )
    assert_error(
        await http.get(url, headers=viewer, params={"cursor": "nope"}), 422, "VALIDATION_ERROR"
    )
    other = bearer(token("viewer", scopes={"regions": ["us-east"]}))
    assert_error(await http.get(url, headers=other), 404, "NOT_FOUND")
    assert_error(
        await http.get("/api/v1/rollouts/999999999/vehicles", headers=viewer), 404, "NOT_FOUND"
    )


@pytest.fixture
async def api_without_temporal(api_settings: Settings) -> AsyncIterator[str]:
    """The app over the same database, pointed at a Temporal address where nothing listens."""
    settings = api_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with serve_app(settings) as url:
        yield url


async def test_control_when_temporal_is_unreachable_is_503_and_audited(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    api_without_temporal: str,
) -> None:
    rid = await create_rollout(http, operator, database_url, signing_key, prefix)
    async with httpx.AsyncClient(base_url=api_without_temporal, timeout=30) as other:
        response = await other.post(
            f"/api/v1/rollouts/{rid}/pause",
            headers={**operator, "X-Request-ID": f"down-{prefix}"},
            json={"reason": "maintenance"},
        )
    body = assert_error(response, 503, "UNAVAILABLE")
    assert "recorded" in body["error"]["message"]
    assert response.headers["retry-after"]
    assert [r[-1] for r in audit_rows(database_url, rid, "rollout.pause_requested")] == ["ok"]
    assert [r[-1] for r in audit_rows(database_url, rid, "rollout.pause_failed")] == ["error"]
