"""Every write route of the app adds an audit entry with the fields of SPEC.md (Audit),
carrying the request's X-Request-ID as its correlation id. The write routes come from the app
itself, so a new write route without an entry here fails the test."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import iter_route_contexts

from api.app import create_app
from core.settings import Settings
from tests.api.test_rollout_control import create_rollout

# Telemetry is not audited per event (docs/audit_log.md): a vehicle's reports are its
# timeline, not an operator's action.
NOT_AUDITED = {("POST", "/api/v1/telemetry")}
SPEC_FIELDS = {
    "id",
    "at",
    "actor",
    "role",
    "source",
    "action",
    "targetType",
    "targetId",
    "reason",
    "correlationId",
    "payload",
    "result",
}


def write_routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    return {
        (method, context.path or "")
        for context in iter_route_contexts(app.routes)
        for method in (getattr(context.original_route, "methods", None) or set())
        if method in {"POST", "PUT", "PATCH", "DELETE"}
    }


async def test_every_write_route_adds_an_entry(
    http: httpx.AsyncClient,
    api_settings: Settings,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = f"audit-{prefix}"
    rollout_id = await create_rollout(
        http, {**operator, "X-Request-ID": f"{rid}-create"}, database_url, signing_key, prefix
    )
    vehicle, release = f"{prefix}000", f"{prefix}2027.1.0"
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rollout_id,))
    desired = await http.post(
        "/api/v1/desired-states",
        headers={**operator, "X-Request-ID": f"{rid}-desired"},
        json={"releaseVersion": release, "targets": {"vehicleIds": [vehicle]}, "reason": "fix"},
    )
    assert desired.status_code == 201, desired.text

    # route -> (request id, action prefix, target type, target id, reason)
    expected: dict[tuple[str, str], tuple[str, str, str, str, str | None]] = {
        ("POST", "/api/v1/rollouts"): (
            f"{rid}-create",
            "rollout.created",
            "rollout",
            str(rollout_id),
            None,
        ),
        ("POST", "/api/v1/desired-states"): (
            f"{rid}-desired",
            "desired_states.created",
            "release",
            release,
            "fix",
        ),
    }
    for action in ("pause", "resume", "rollback", "abort"):
        response = await http.post(
            f"/api/v1/rollouts/{rollout_id}/{action}",
            headers={**operator, "X-Request-ID": f"{rid}-{action}"},
            json={"reason": f"audit {action}"},
        )
        # The rollout is completed: the request is refused, and the refusal is audited.
        assert response.status_code == 409, response.text
        expected[("POST", "/api/v1/rollouts/{rollout_id}/" + action)] = (
            f"{rid}-{action}",
            f"rollout.{action}_",
            "rollout",
            str(rollout_id),
            f"audit {action}",
        )

    assert write_routes(api_settings) - NOT_AUDITED == set(expected)

    for route, (request_id, action, target_type, target_id, reason) in expected.items():
        listed = await http.get(
            "/api/v1/audit-log",
            headers=viewer,
            params={"targetType": target_type, "targetId": target_id, "limit": 500},
        )
        assert listed.status_code == 200, listed.text
        entries: list[dict[str, Any]] = [
            e for e in listed.json()["data"] if e["correlationId"] == request_id
        ]
        assert entries, (route, listed.json()["data"])
        entry = entries[-1]  # the first written (newest first)
        assert set(entry) >= SPEC_FIELDS, route
        assert entry["action"].startswith(action), (route, entry)
        assert entry["source"] == "api" and entry["result"], (route, entry)
        assert entry["actor"] and entry["role"] == "operator", (route, entry)
        assert entry["targetType"] == target_type and entry["targetId"] == target_id
        assert isinstance(entry["payload"], dict) and entry["payload"], (route, entry)
        if reason is not None:
            assert entry["reason"] == reason, (route, entry)
