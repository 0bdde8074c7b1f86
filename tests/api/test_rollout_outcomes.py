"""Event-driven gates end to end: telemetry posted to the API moves a rollout's vehicles, the
API signals the rollout's workflow (`outcomes`, coalesced), and its gates act at once. The
real app, the dev server and a real worker; the workflow's own gate tick (60 s while a stage
settles) never comes within the test."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import Client

from core.temporal import rollout_workflow_id
from models.workflows import RolloutState
from tests.api.conftest import bearer
from tests.api.telemetry import URL, event
from tests.api.test_rollout_control import audit_rows, create_rollout, wait_for_status
from tests.workflows.conftest import eventually


async def _canary(database_url: str, rid: int) -> list[tuple[str, str]]:
    """The canary's notified vehicles and the desired state each was given."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT t.vehicle_id, v.desired_state_id::text FROM rollout_targets t"
            " JOIN vehicles v ON v.id = t.vehicle_id"
            " WHERE t.rollout_id = %s AND t.stage = 0 AND t.state = 'notified'"
            " ORDER BY t.vehicle_id",
            (rid,),
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


async def test_failed_telemetry_pauses_the_rollout_through_its_outcomes_signal(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    rollout_worker: None,
    temporal_client: Client,
) -> None:
    rid = await create_rollout(
        http,
        operator,
        database_url,
        signing_key,
        prefix,
        n=10,
        strategy={
            "canary": {"size": 2, "bakeSeconds": 3600},
            "waves": [{"percent": 100, "bakeSeconds": 0}],
        },
        gates={"failureThreshold": {"maxFailureRate": 0.1, "action": "pause"}},
    )
    canary = await eventually(lambda: _canary(database_url, rid), lambda c: len(c) == 2)
    data = await wait_for_status(http, viewer, rid, "running")
    assert data["stage"] == "canary"

    gateway = bearer(token("gateway"))
    events = [event(vid, 1, "failed", ds, reason="SIGNATURE_INVALID") for vid, ds in canary]
    posted = await http.post(URL, headers=gateway, json={"events": events})
    assert posted.status_code == 202, posted.text

    # Paused by the signal: the settle's gate tick is a minute away.
    paused = await wait_for_status(http, viewer, rid, "paused", within=45)
    assert paused["statusReason"] == "FAILURE_THRESHOLD" and paused["stage"] == "canary"
    assert paused["progress"]["failed"] == 2 and paused["progress"]["notified"] == 2
    state = await temporal_client.get_workflow_handle(rollout_workflow_id(rid)).query(
        "progress", result_type=RolloutState
    )
    assert state.outcome_signals >= 1 and state.phase == "settle"
    assert audit_rows(database_url, rid, "rollout.gate_failed")
    await http.post(f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "done"})
    await wait_for_status(http, viewer, rid, "aborted")
