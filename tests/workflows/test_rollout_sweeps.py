"""RolloutWorkflow's per-vehicle housekeeping at each gate tick, on the time-skipping server
with the real activities over PostgreSQL: apply timeouts, retries of retryable failures,
rechecks of blocked vehicles."""

from __future__ import annotations

from sqlalchemy import text
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from tests.factories import Sessions, fetch_all, stage_vehicles
from tests.workflows.conftest import (
    GATE_INTERVAL,
    HOUR,
    NEVER_TIMES_OUT,
    StartRollout,
    baking,
    report,
    reporting_fleet,
    settling,
    target_states,
    until,
)


async def test_apply_timeout_fails_silent_vehicles(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.3, "minSamples": 1},
            "failureThreshold": {"maxFailureRate": 1.0},
        },
        timeouts={"applySeconds": 900},
        retry={"maxAttempts": 1},
    )
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:1], "succeeded", handle=handle)
    await report(sessions, rollout_id, canary[1:2], "updating", handle=handle)
    result = await handle.result()  # every stage settles once its silent vehicles time out
    assert result.status == "completed"
    states = await target_states(sessions, rollout_id)
    assert states[:2] == [
        {"stage": 0, "state": "failed", "reason_code": "APPLY_TIMEOUT", "attempt": 1, "n": 2},
        {"stage": 0, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 1},
    ]


async def test_retryable_failure_is_retried_and_signature_invalid_is_not(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    started = await rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.3, "minSamples": 1},
            "failureThreshold": {"maxFailureRate": 1.0},
        },
        timeouts=NEVER_TIMES_OUT,
        retry={"maxAttempts": 2, "backoffSeconds": 60},
    )
    rollout_id, handle = started
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:1], "failed", "NETWORK_UNREACHABLE", handle=handle)
    await report(sessions, rollout_id, canary[1:2], "failed", "SIGNATURE_INVALID", handle=handle)
    await report(sessions, rollout_id, canary[2:], "succeeded", handle=handle)
    # Not settled: the NETWORK_UNREACHABLE one has a retry to come.
    state = await until(handle, lambda s: (s.last_total.failed, s.last_total.succeeded) == (2, 1))
    assert state.phase == "settle"
    # The Web UI's current details say so (read through the SDK's built-in query).
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "settle of canary: 0 of 3 vehicles still applying, 1 to be retried" in (
        metadata.current_details
    )
    async with reporting_fleet(sessions, started):  # the retried vehicle, then the waves
        result = await handle.result()
    assert result.status == "completed"
    targets = {
        r["vehicle_id"]: (r["state"], r["reason_code"], r["attempt"])
        for r in await fetch_all(
            sessions,
            "SELECT vehicle_id, state, reason_code, attempt FROM rollout_targets"
            " WHERE rollout_id = :r AND stage = 0",
            r=rollout_id,
        )
    }
    assert targets[canary[0]] == ("succeeded", None, 2)  # re-issued, then ready
    assert targets[canary[1]] == ("failed", "SIGNATURE_INVALID", 1)  # never retried
    # Desired states are per target set: the retried vehicle points to the one of attempt 2,
    # the SIGNATURE_INVALID one still to the canary's.
    pointing = await fetch_all(
        sessions,
        "SELECT v.id AS vehicle_id, d.reason, d.vehicle_id IS NULL AS target_set"
        " FROM vehicles v JOIN desired_states d ON d.id = v.desired_state_id"
        " WHERE v.id = ANY(:v) ORDER BY v.id",
        v=canary[:2],
    )
    assert pointing == [
        {"vehicle_id": canary[0], "reason": f"retry 2 of rollout {rollout_id}", "target_set": True},
        {"vehicle_id": canary[1], "reason": f"rollout {rollout_id}, stage 0", "target_set": True},
    ]


async def test_blocked_vehicle_is_rechecked_when_its_heartbeat_passes(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    started = await rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.5, "minSamples": 1},
            "safetyChecks": {"requireStationary": True, "minBatteryPercent": 40},
        },
        timeouts=NEVER_TIMES_OUT,
    )
    rollout_id, handle = started
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:2], "blocked", "BATTERY_LOW", handle=handle)
    await report(sessions, rollout_id, canary[2:], "succeeded", handle=handle)
    await until(handle, baking("canary"))  # blocked is an outcome: the canary settled
    await time_skipping_env.sleep(GATE_INTERVAL + 60)  # a tick sees them blocked
    async with session_scope(sessions) as session:
        conn = await session.connection()
        await conn.execute(
            text(
                "UPDATE vehicles SET battery_percent = 85, stationary = true,"
                " last_seen_at = now() + interval '1 second' WHERE id = :v"
            ),
            {"v": canary[0]},
        )
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed"
    rows = await fetch_all(
        sessions,
        "SELECT vehicle_id, state, reason_code FROM rollout_targets"
        " WHERE rollout_id = :r AND vehicle_id = ANY(:v) ORDER BY vehicle_id",
        r=rollout_id,
        v=canary[:2],
    )
    assert [(r["state"], r["reason_code"]) for r in rows] == [
        ("succeeded", None),  # passed the checks: notified again, then ready
        ("blocked", "BATTERY_LOW"),  # no heartbeat since: still blocked
    ]
