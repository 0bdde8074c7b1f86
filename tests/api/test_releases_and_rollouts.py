"""Releases list; POST /rollouts stores the rollout and starts workflow rollout-{id}."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from core.temporal import (
    ROLLOUT_TASK_QUEUE,
    SA_RELEASE_VERSION,
    SA_ROLLOUT_ID,
    rollout_workflow_id,
)
from tests.api.conftest import bearer, insert_release, insert_vehicles
from tests.api.test_envelopes import assert_error


def rollout_body(release: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "test rollout",
        "releaseVersion": release,
        "targets": {"regions": ["eu-west"]},
        "strategy": {
            "canary": {"size": 1, "bakeSeconds": 600},
            "waves": [{"percent": 50, "bakeSeconds": 600}, {"percent": 100, "bakeSeconds": 0}],
        },
    }
    body.update(overrides)
    return body


async def test_releases_list_and_get(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    version = f"{prefix}r1"
    insert_release(database_url, version)
    listed = (await http.get("/api/v1/releases?sort=version&limit=500", headers=viewer)).json()
    assert version in [r["version"] for r in listed["data"]]
    one = await http.get(f"/api/v1/releases/{version}", headers=viewer)
    assert one.status_code == 200 and one.json()["data"]["artifactDigest"] == "sha256:00"
    assert_error(await http.get("/api/v1/releases/none", headers=viewer), 404, "NOT_FOUND")


async def test_create_rollout_starts_its_workflow(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    dev_server_env: WorkflowEnvironment,
) -> None:
    release = f"{prefix}2026.11.0"
    insert_release(database_url, release)
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(4)])
    response = await http.post(
        "/api/v1/rollouts",
        headers={**operator, "X-Request-ID": f"req-{prefix}"},
        json=rollout_body(release),
    )
    assert response.status_code == 201, response.text
    rollout = response.json()["data"]
    rid = rollout["id"]
    assert response.headers["location"] == f"/api/v1/rollouts/{rid}"
    assert rollout["workflowId"] == rollout_workflow_id(rid) == f"rollout-{rid}"
    assert rollout["temporalUiUrl"].endswith(f"/namespaces/default/workflows/rollout-{rid}")
    assert rollout["gates"]["safetyChecks"]["minBatteryPercent"] == 30  # fleet default filled
    assert rollout["createdBy"] == "dev-operator"

    handle = dev_server_env.client.get_workflow_handle(f"rollout-{rid}")
    description = await handle.describe()
    assert description.task_queue == ROLLOUT_TASK_QUEUE
    assert description.workflow_type == "RolloutWorkflow"
    assert description.status in {
        WorkflowExecutionStatus.RUNNING,
        WorkflowExecutionStatus.COMPLETED,
    }
    attributes = description.typed_search_attributes
    assert attributes.get(SA_ROLLOUT_ID) == str(rid)
    assert attributes.get(SA_RELEASE_VERSION) == release

    fetched = await http.get(f"/api/v1/rollouts/{rid}", headers=viewer)
    assert fetched.status_code == 200 and fetched.json()["data"]["id"] == rid
    listed = (await http.get("/api/v1/rollouts?limit=500", headers=viewer)).json()["data"]
    assert rid in [r["id"] for r in listed]

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT actor, role, source, correlation_id FROM audit_log "
            "WHERE action = 'rollout.created' AND target_id = %s",
            (str(rid),),
        ).fetchone()
    assert row == ("dev-operator", "operator", "api", f"req-{prefix}")


async def test_rollout_validation(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    release = f"{prefix}2026.11.1"
    insert_release(database_url, release)
    missing = await http.post("/api/v1/rollouts", headers=operator, json=rollout_body("nope"))
    body = assert_error(missing, 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "releaseVersion"

    no_targets = rollout_body(release, targets={})
    assert_error(
        await http.post("/api/v1/rollouts", headers=operator, json=no_targets),
        422,
        "VALIDATION_ERROR",
    )
    unknown_field = rollout_body(release, colour="red")
    body = assert_error(
        await http.post("/api/v1/rollouts", headers=operator, json=unknown_field),
        422,
        "VALIDATION_ERROR",
    )
    assert body["error"]["details"][0]["field"] == "colour"


async def test_weakened_safety_needs_acknowledgement(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    release = f"{prefix}2026.11.2"
    insert_release(database_url, release)
    weak = rollout_body(release, gates={"safetyChecks": {"minBatteryPercent": 5}})
    body = assert_error(
        await http.post("/api/v1/rollouts", headers=operator, json=weak),
        422,
        "SAFETY_POLICY_WEAKENED",
    )
    assert body["error"]["details"][0]["field"] == "gates.safetyChecks.minBatteryPercent"
    acknowledged = {**weak, "acknowledgeWeakenedSafety": True, "reason": "lab fleet"}
    response = await http.post("/api/v1/rollouts", headers=operator, json=acknowledged)
    assert response.status_code == 201, response.text
    rid = response.json()["data"]["id"]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT reason, payload->'weakened' FROM audit_log "
            "WHERE action = 'rollout.safety_weakened' AND target_id = %s",
            (str(rid),),
        ).fetchone()
    assert row == ("lab fleet", ["minBatteryPercent"])


async def test_scoped_operator_cannot_target_outside_scope(
    http: httpx.AsyncClient,
    token,
    database_url: str,
    prefix: str,  # type: ignore[no-untyped-def]
) -> None:
    release = f"{prefix}2026.11.3"
    insert_release(database_url, release)
    scoped = bearer(token("operator", scopes={"regions": ["us-east"]}))
    response = await http.post("/api/v1/rollouts", headers=scoped, json=rollout_body(release))
    assert_error(response, 403, "FORBIDDEN")
    inside = rollout_body(release, targets={"regions": ["us-east"]})
    created = await http.post("/api/v1/rollouts", headers=scoped, json=inside)
    assert created.status_code == 201, created.text
    # A viewer scoped elsewhere does not see it.
    other = bearer(token("viewer", scopes={"regions": ["eu-west"]}))
    rid = created.json()["data"]["id"]
    assert_error(await http.get(f"/api/v1/rollouts/{rid}", headers=other), 404, "NOT_FOUND")
