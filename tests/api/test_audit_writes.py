"""Every write route of the app adds an audit entry with the fields of SPEC.md (Audit),
carrying the request's X-Request-ID as its correlation id. The write routes come from the app
itself, so a new write route without an entry here fails the test."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import iter_route_contexts

from api.app import create_app
from core.settings import Settings
from services.signing import sign_release
from tests.api.conftest import bearer
from tests.api.test_releases_and_rollouts import rollout_body
from tests.api.test_rollout_control import create_rollout
from tests.factories import COMPONENTS, insert_signed_release, insert_vehicles

Route = tuple[str, str]  # (method, path template)
# Telemetry is not audited per event (docs/audit_log.md): a vehicle's reports are its
# timeline, not an operator's action.
# A stream ticket changes nothing either (nothing is stored).
# The dashboard's sign-in handover writes nothing: it hands the page the token the issuer's
# callback left (api/dashboard.py).
NOT_AUDITED: set[Route] = {
    ("POST", "/api/v1/telemetry"),
    ("POST", "/api/v1/stream/tickets"),
    ("POST", "/auth/session"),
}
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


def write_routes(settings: Settings) -> set[Route]:
    app = create_app(settings)
    return {
        (method, context.path or "")
        for context in iter_route_contexts(app.routes)
        for method in (getattr(context.original_route, "methods", None) or set())
        if method in {"POST", "PUT", "PATCH", "DELETE"}
    }


class Entry(NamedTuple):
    """What a write's audit entry carries (`action` is a prefix of the entry's action), found
    by the write's request id."""

    request_id: str
    action: str
    target_type: str
    target_id: str
    reason: str | None = None


async def _post(
    http: httpx.AsyncClient, operator: dict, request_id: str, path: str, body: dict, status: int
) -> None:
    """POST as the operator, under its own X-Request-ID; the answer is `status`."""
    headers = {**operator, "X-Request-ID": request_id}
    response = await http.post(path, headers=headers, json=body)
    assert response.status_code == status, response.text


async def _write_through_every_route(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> dict[Route, Entry]:
    """One write through each audited route, as the operator, each under an X-Request-ID of
    its own; returns the entry each route should have added."""
    rid = f"audit-{prefix}"
    rollout_id = await create_rollout(
        http, {**operator, "X-Request-ID": f"{rid}-create"}, database_url, signing_key, prefix
    )
    vehicle, release = f"{prefix}000", f"{prefix}2027.1.0"
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rollout_id,))
    desired = {"releaseVersion": release, "targets": {"vehicleIds": [vehicle]}, "reason": "fix"}
    await _post(http, operator, f"{rid}-desired", "/api/v1/desired-states", desired, 201)
    new_version, digest = f"{prefix}2027.8.0", "sha256:" + "34" * 32
    signature, kid = sign_release(signing_key, new_version, digest, COMPONENTS)
    new_release = {
        "version": new_version,
        "components": COMPONENTS,
        "artifactDigest": digest,
        "signature": signature,
        "signingKeyId": kid,
    }
    await _post(http, operator, f"{rid}-release", "/api/v1/releases", new_release, 201)
    new_vehicle = f"{prefix}NEW"
    registration = {"id": new_vehicle, "model": "atlas", "region": "eu-west", "ring": "canary"}
    await _post(http, operator, f"{rid}-vehicle", "/api/v1/vehicles", registration, 201)

    rollout = str(rollout_id)
    expected = {
        ("POST", "/api/v1/rollouts"): Entry(f"{rid}-create", "rollout.created", "rollout", rollout),
        ("POST", "/api/v1/desired-states"): Entry(
            f"{rid}-desired", "desired_states.created", "release", release, "fix"
        ),
        ("POST", "/api/v1/releases"): Entry(
            f"{rid}-release", "release.created", "release", new_version
        ),
        ("POST", "/api/v1/vehicles"): Entry(
            f"{rid}-vehicle", "vehicle.registered", "vehicle", new_vehicle
        ),
    }
    for action in ("pause", "resume", "rollback", "abort"):
        # The rollout is completed: the request is refused, and the refusal is audited.
        path = f"/api/v1/rollouts/{rollout_id}/{action}"
        await _post(http, operator, f"{rid}-{action}", path, {"reason": f"audit {action}"}, 409)
        expected[("POST", "/api/v1/rollouts/{rollout_id}/" + action)] = Entry(
            f"{rid}-{action}", f"rollout.{action}_", "rollout", rollout, f"audit {action}"
        )
    return expected


async def _assert_entry(
    http: httpx.AsyncClient, viewer: dict, route: Route, expected: Entry
) -> None:
    """The first entry written under the request id has the fields of SPEC.md and the values
    the route should have written."""
    listed = await http.get(
        "/api/v1/audit-log",
        headers=viewer,
        params={"targetType": expected.target_type, "targetId": expected.target_id, "limit": 500},
    )
    assert listed.status_code == 200, listed.text
    entries: list[dict[str, Any]] = [
        e for e in listed.json()["data"] if e["correlationId"] == expected.request_id
    ]
    assert entries, (route, listed.json()["data"])
    entry = entries[-1]  # the first written (newest first)
    assert set(entry) >= SPEC_FIELDS, route
    assert entry["action"].startswith(expected.action), (route, entry)
    assert entry["source"] == "api" and entry["result"], (route, entry)
    assert entry["actor"] and entry["role"] == "operator", (route, entry)
    assert entry["targetType"] == expected.target_type
    assert entry["targetId"] == expected.target_id
    assert isinstance(entry["payload"], dict) and entry["payload"], (route, entry)
    if expected.reason is not None:
        assert entry["reason"] == expected.reason, (route, entry)


async def test_every_write_route_adds_an_entry(
    http: httpx.AsyncClient,
    api_settings: Settings,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    expected = await _write_through_every_route(http, operator, database_url, prefix, signing_key)
    assert write_routes(api_settings) - NOT_AUDITED == set(expected)
    for route, entry in expected.items():
        await _assert_entry(http, viewer, route, entry)


async def test_a_scoped_caller_sees_the_entries_of_the_rollouts_it_sees_and_no_others(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2027.3.0"
    insert_signed_release(database_url, signing_key, release)
    west_ids = [f"{prefix}w{i}" for i in range(2)]
    east_ids = [f"{prefix}e{i}" for i in range(2)]
    insert_vehicles(database_url, west_ids, region="eu-west")
    insert_vehicles(database_url, east_ids, region="us-east")

    async def create(ids: list[str], regions: list[str]) -> str:
        body = rollout_body(release, targets={"vehicleIds": ids, "regions": regions})
        response = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["data"]["id"])

    west_only = await create(west_ids[:1], ["eu-west"])
    both = await create(west_ids[1:] + east_ids, ["eu-west", "us-east"])
    west = bearer(token("viewer", scopes={"regions": ["eu-west"]}))

    async def entries(headers: dict, rollout_id: str) -> list[dict]:
        params: dict[str, Any] = {"targetType": "rollout", "targetId": rollout_id, "limit": 500}
        response = await http.get("/api/v1/audit-log", headers=headers, params=params)
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    assert (await http.get(f"/api/v1/rollouts/{west_only}", headers=west)).status_code == 200
    assert await entries(west, west_only)
    # The rollout that also reaches us-east is NOT_FOUND to the west viewer, and so are its
    # audit entries (absent from the list and the export), though an unscoped viewer sees them.
    assert (await http.get(f"/api/v1/rollouts/{both}", headers=west)).status_code == 404
    assert await entries(viewer, both)
    assert await entries(west, both) == []
    export = await http.get(
        "/api/v1/audit-log/export",
        headers=west,
        params={"targetType": "rollout", "targetId": f"{west_only},{both}"},
    )
    assert export.status_code == 200
    exported = [json.loads(line) for line in export.text.splitlines() if line]
    assert exported and {e["targetId"] for e in exported} == {west_only}
