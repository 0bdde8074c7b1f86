"""Releases list; POST /rollouts validates (signature, safety, overlap), plans (`dryRun`),
stores the rollout and starts workflow rollout-{id}."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from api.routes.rollouts import _stored
from core.temporal import (
    ROLLOUT_TASK_QUEUE,
    SA_RELEASE_VERSION,
    SA_ROLLOUT_ID,
    rollout_workflow_id,
)
from models.api import RolloutCreate, Timeouts
from services.signing import generate_signing_key
from tests.api.conftest import bearer
from tests.api.test_envelopes import assert_error
from tests.factories import insert_release, insert_signed_release, insert_vehicles


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


def own_targets(prefix: str, n: int, **vehicle_kw: Any) -> dict[str, Any]:
    """Insert n vehicles of this test and return targets that select only them."""
    ids = [f"{prefix}{i}" for i in range(n)]
    return {"vehicleIds": ids, "regions": [vehicle_kw.get("region", "eu-west")]}


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
    signing_key: Ed25519PrivateKey,
    dev_server_env: WorkflowEnvironment,
) -> None:
    release = f"{prefix}2026.11.0"
    insert_signed_release(database_url, signing_key, release)
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(4)])
    response = await http.post(
        "/api/v1/rollouts",
        headers={**operator, "X-Request-ID": f"req-{prefix}"},
        json=rollout_body(release, targets=own_targets(prefix, 4)),
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
    # What was sent comes back typed as it was sent, defaults filled in (RolloutCreate's types).
    sent = RolloutCreate.model_validate(rollout_body(release, targets=own_targets(prefix, 4)))
    shown = fetched.json()["data"]
    for part in ("targets", "strategy", "timeouts", "retry"):
        assert shown[part] == getattr(sent, part).model_dump(by_alias=True, mode="json"), part
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
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2026.11.1"
    insert_signed_release(database_url, signing_key, release)
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


async def test_bad_signature_is_refused(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(2)])
    targets = own_targets(prefix, 2)
    tampered = f"{prefix}tampered"
    insert_signed_release(database_url, signing_key, tampered, signed_digest="sha256:" + "cd" * 32)
    unknown_key = f"{prefix}unknown-key"
    insert_signed_release(database_url, generate_signing_key(), unknown_key)
    unsigned = f"{prefix}unsigned"
    insert_release(database_url, unsigned)  # signature "c2ln" by key "k"
    for version, reason in ((tampered, "mismatch"), (unknown_key, "unknown_key"), (unsigned, "")):
        for path in ("/api/v1/rollouts", "/api/v1/rollouts?dryRun=true"):
            response = await http.post(
                path, headers=operator, json=rollout_body(version, targets=targets)
            )
            body = assert_error(response, 422, "RELEASE_SIGNATURE_INVALID")
            assert body["error"]["details"][0]["field"] == "releaseVersion"
            if reason:
                assert body["error"]["details"][0]["code"] == reason
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM rollouts WHERE release_version = ANY(%s)",
            ([tampered, unknown_key, unsigned],),
        ).fetchone()
    assert stored == (0,)


async def test_weakened_safety_needs_acknowledgement(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2026.11.2"
    insert_signed_release(database_url, signing_key, release)
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(2)])
    weak = rollout_body(
        release,
        targets=own_targets(prefix, 2),
        gates={"safetyChecks": {"minBatteryPercent": 5}},
    )
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
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2026.11.3"
    insert_signed_release(database_url, signing_key, release)
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(2)], region="us-east")
    scoped = bearer(token("operator", scopes={"regions": ["us-east"]}))
    response = await http.post("/api/v1/rollouts", headers=scoped, json=rollout_body(release))
    assert_error(response, 403, "FORBIDDEN")
    inside = rollout_body(release, targets=own_targets(prefix, 2, region="us-east"))
    created = await http.post("/api/v1/rollouts", headers=scoped, json=inside)
    assert created.status_code == 201, created.text
    # A viewer scoped elsewhere does not see it.
    other = bearer(token("viewer", scopes={"regions": ["eu-west"]}))
    rid = created.json()["data"]["id"]
    assert_error(await http.get(f"/api/v1/rollouts/{rid}", headers=other), 404, "NOT_FOUND")


def _set_telemetry(database_url: str, rows: list[tuple[str, int | None, bool | None]]) -> None:
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "UPDATE vehicles SET battery_percent = %s, stationary = %s WHERE id = %s",
            [(battery, stationary, vid) for vid, battery, stationary in rows],
        )


async def test_dry_run_returns_the_plan_and_creates_nothing(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    dev_server_env: WorkflowEnvironment,
) -> None:
    release = f"{prefix}2026.12.0"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(10)]
    insert_vehicles(database_url, ids)
    _set_telemetry(
        database_url,
        [(vid, 80, True) for vid in ids[:6]]
        + [(ids[6], 10, True), (ids[7], 80, False), (ids[8], 5, False), (ids[9], None, None)],
    )
    body = rollout_body(
        release,
        targets=own_targets(prefix, 10),
        strategy={
            "canary": {"size": 2, "bakeSeconds": 600},
            "waves": [{"percent": 50, "bakeSeconds": 300}, {"percent": 100, "bakeSeconds": 0}],
        },
    )
    request_id = f"dry-{prefix}"
    response = await http.post(
        "/api/v1/rollouts?dryRun=true",
        headers={**operator, "X-Request-ID": request_id},
        json=body,
    )
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["metadata"]["dryRun"] is True
    plan = envelope["data"]
    assert plan["releaseVersion"] == release
    assert plan["targeted"] == 10
    assert [(s["name"], s["vehicles"], s["bakeSeconds"]) for s in plan["stages"]] == [
        ("canary", 2, 600),
        ("wave-1", 3, 300),
        ("wave-2", 5, 0),
    ]
    assert plan["safety"] == {
        "requireStationary": True,
        "minBatteryPercent": 30,
        "blocked": 3,
        "batteryLow": 2,
        "notStationary": 2,
        "unknown": 1,
        "offline": 0,
    }
    assert plan["overlap"] == {"vehicles": 0, "sampleVehicleIds": [], "rolloutIds": []}
    assert plan["canStart"] is True and plan["problems"] == []

    # Weakened without acknowledgement: reported, not refused, in a dry run.
    weak = {**body, "gates": {"safetyChecks": {"minBatteryPercent": 5}}}
    weak_plan = (
        await http.post("/api/v1/rollouts?dryRun=true", headers=operator, json=weak)
    ).json()["data"]
    assert weak_plan["weakenedSafety"] == ["minBatteryPercent"]
    assert weak_plan["canStart"] is False
    assert weak_plan["safety"]["batteryLow"] == 0

    with psycopg.connect(database_url) as conn:
        rollouts = conn.execute(
            "SELECT count(*) FROM rollouts WHERE release_version = %s", (release,)
        ).fetchone()
        audits = conn.execute(
            "SELECT count(*) FROM audit_log WHERE correlation_id = %s", (request_id,)
        ).fetchone()
        desired = conn.execute(
            "SELECT count(*) FROM vehicles WHERE id = ANY(%s) AND desired_release_version = %s",
            (ids, release),
        ).fetchone()
    assert (rollouts, audits, desired) == ((0,), (0,), (0,))
    running = await dev_server_env.client.count_workflows(f"ReleaseVersion = '{release}'")
    assert running.count == 0


async def test_overlap_with_an_active_rollout_is_refused(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2026.12.1"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(6)]
    insert_vehicles(database_url, ids)
    first = await http.post(
        "/api/v1/rollouts",
        headers=operator,
        json=rollout_body(release, targets={"vehicleIds": ids[:4]}),
    )
    assert first.status_code == 201, first.text
    first_id = first.json()["data"]["id"]

    overlapping = rollout_body(release, targets={"vehicleIds": ids[2:]})
    plan = (
        await http.post("/api/v1/rollouts?dryRun=true", headers=operator, json=overlapping)
    ).json()["data"]
    assert plan["overlap"] == {
        "vehicles": 2,
        "sampleVehicleIds": ids[2:4],
        "rolloutIds": [first_id],
    }
    assert plan["canStart"] is False

    body = assert_error(
        await http.post("/api/v1/rollouts", headers=operator, json=overlapping), 409, "CONFLICT"
    )
    assert str(first_id) in body["error"]["message"]
    flagged = [d["message"] for d in body["error"]["details"]]
    assert any(ids[2] in m for m in flagged) and any(ids[3] in m for m in flagged)

    # Disjoint targets are fine.
    disjoint = rollout_body(release, targets={"vehicleIds": ids[4:]})
    created = await http.post("/api/v1/rollouts", headers=operator, json=disjoint)
    assert created.status_code == 201, created.text

    # Once the first rollout is finished, its vehicles are free again.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'aborted' WHERE id = %s", (first_id,))
    again = rollout_body(release, targets={"vehicleIds": ids[:2]})
    assert (await http.post("/api/v1/rollouts", headers=operator, json=again)).status_code == 201


async def test_a_stored_rollout_part_that_no_longer_validates_is_shown_as_stored(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    """A rule made stricter after a rollout was created (here: an apply timeout below today's
    minimum, and an empty strategy): its GET and the list still answer, with the parts as
    stored (and a warning in the log), never a 500. Completed: an active rollout with empty
    targets would hold every vehicle of the run's database."""
    release = f"{prefix}r"
    insert_release(database_url, release)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO rollouts (release_version, targets, strategy, timeouts, status,"
            " created_by) VALUES (%s, '{}', '{}', '{\"applySeconds\": 5}', 'completed', 'test')"
            " RETURNING id",
            (release,),
        ).fetchone()
    assert row is not None
    shown = await http.get(f"/api/v1/rollouts/{row[0]}", headers=viewer)
    assert shown.status_code == 200, shown.text
    assert shown.json()["data"]["timeouts"] == {"applySeconds": 5}
    assert shown.json()["data"]["strategy"] == {}
    listed = await http.get(f"/api/v1/rollouts?releaseVersion={release}", headers=viewer)
    assert listed.status_code == 200, listed.text
    assert [r["id"] for r in listed.json()["data"]] == [row[0]]
    assert _stored(Timeouts, {"applySeconds": 5}, rollout_id=1).model_dump(by_alias=True) == {
        "applySeconds": 5
    }
