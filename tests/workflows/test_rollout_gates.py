"""RolloutWorkflow's gates on the time-skipping server, with the real activities over
PostgreSQL: the canary's health, the failure threshold and the maintenance window. Vehicles'
outcomes are simulated through `record_target_outcomes` (the telemetry path's entry point)
while a stage bakes."""

from __future__ import annotations

from datetime import UTC, timedelta

from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from models.workflows import RolloutSignal
from tests.factories import Sessions, fetch_all, fetch_one, stage_vehicles
from tests.workflows.conftest import (
    HOUR,
    NEVER_TIMES_OUT,
    Started,
    StartRollout,
    audit_actions,
    baking,
    eventually,
    report,
    reporting_fleet,
    settling,
    target_states,
    through_healthy_canary,
    until,
)


async def test_canary_and_waves_complete_when_vehicles_succeed(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout()  # default gates: 95% of at least 1, at most 5% failed
    for stage, name in enumerate(("canary", "wave-1", "wave-2")):
        await until(handle, settling(name))
        vehicles = await stage_vehicles(sessions, rollout_id, stage)
        await report(sessions, rollout_id, vehicles[:1], "updating", handle=handle)
        await report(sessions, rollout_id, vehicles, "succeeded", handle=handle)
        await until(handle, baking(name))
        if name != "wave-2":
            await time_skipping_env.sleep(HOUR + 60)
    result = await handle.result()
    assert result.status == "completed" and result.status_reason is None
    assert result.counts.succeeded == 60 and result.counts.failed == 0
    assert result.counts.updating == 0 and result.counts.notified == 60
    assert await target_states(sessions, rollout_id) == [
        {"stage": 0, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 3},
        {"stage": 1, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 27},
        {"stage": 2, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 30},
    ]


async def test_unhealthy_canary_pauses_and_does_not_progress(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={
            "canaryHealthy": {"minSuccessRate": 0.9, "minSamples": 2},
            "failureThreshold": {"maxFailureRate": 1},
        },
        timeouts=NEVER_TIMES_OUT,
    )
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:1], "succeeded", handle=handle)
    await report(sessions, rollout_id, canary[1:], "failed", "SIGNATURE_INVALID", handle=handle)
    await until(handle, baking("canary"))  # settled: 1 of 3 ready
    await time_skipping_env.sleep(HOUR + 60)
    state = await until(handle, lambda s: s.status == "paused")
    assert state.status_reason == "CANARY_UNHEALTHY" and state.stage == "canary"
    assert state.waiting_for == "an operator (resume, rollback or abort)"

    await time_skipping_env.sleep(5 * HOUR)  # it never progresses by itself
    row = await fetch_one(
        sessions,
        "SELECT status, status_reason, stage, notified, pending FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert row == {
        "status": "paused",
        "status_reason": "CANARY_UNHEALTHY",
        "stage": "canary",
        "notified": 3,
        "pending": 57,
    }
    # The Web UI's current details say why (read through the SDK's built-in query: the
    # time-skipping server does not keep them in the execution's description).
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert metadata.current_details.startswith("**paused** (CANARY_UNHEALTHY), stage canary")

    # Resume re-evaluates: still unhealthy, it pauses again.
    await handle.signal("resume", RolloutSignal(reason="look again", actor="dana"))
    await eventually(
        lambda: audit_actions(sessions, rollout_id),
        lambda actions: actions.count("rollout.gate_failed") == 2,
    )
    state = await until(handle, lambda s: s.status == "paused")
    assert state.stage == "canary" and state.counts.notified == 3

    # An operator may force it through, on the record.
    await handle.signal(
        "resume", RolloutSignal(reason="known flaky sensor", actor="dana", force=True)
    )
    await until(handle, settling("wave-1"))
    await handle.signal("abort", RolloutSignal(reason="enough", actor="dana"))
    result = await handle.result()
    assert result.status == "aborted" and result.counts.notified == 30
    audit = await fetch_all(
        sessions,
        "SELECT action, actor, reason FROM audit_log WHERE target_type = 'rollout'"
        " AND target_id = :t AND action IN ('rollout.gate_failed', 'rollout.resumed') ORDER BY id",
        t=str(rollout_id),
    )
    assert [(a["action"], a["actor"]) for a in audit] == [
        ("rollout.gate_failed", "workflow"),
        ("rollout.resumed", "dana"),
        ("rollout.gate_failed", "workflow"),
        ("rollout.resumed", "dana"),
    ]
    assert "canary: 1 of 3 reported vehicles ready" in (audit[0]["reason"] or "")


async def test_failure_threshold_mid_wave_pauses_until_resumed(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.1, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    started = Started(rollout_id, handle)
    wave = await through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    # 4 of the 30 notified so far fail (13% > 10%) while wave-1 settles: the outcomes
    # signal pauses it at once (no gate tick comes: time does not move here).
    await report(sessions, rollout_id, wave[:4], "failed", "SIGNATURE_INVALID", handle=handle)
    state = await until(handle, lambda s: s.status == "paused")
    assert (state.status_reason, state.stage) == ("FAILURE_THRESHOLD", "wave-1")
    await time_skipping_env.sleep(3 * HOUR)  # well past the wave's bake: still held
    row = await fetch_one(
        sessions,
        "SELECT status, status_reason, stage, notified, failed FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert row == {
        "status": "paused",
        "status_reason": "FAILURE_THRESHOLD",
        "stage": "wave-1",
        "notified": 30,
        "failed": 4,
    }
    # Resume acknowledges the failures seen so far; the rollout goes on.
    await handle.signal("resume", RolloutSignal(reason="bad batch of modems", actor="erin"))
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed" and result.counts.notified == 60
    assert result.counts.failed == 4 and result.counts.succeeded == 56


async def test_waits_for_the_maintenance_window_then_proceeds(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    # The time-skipping server's clock (ahead of the wall clock after earlier tests' skips).
    now = await time_skipping_env.get_current_time()
    opens = (now.astimezone(UTC) + timedelta(hours=2)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    started = await rollout(
        bakes=(60, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0, "minSamples": 0},
            "safetyChecks": {
                "maintenanceWindow": {
                    "start": opens.strftime("%H:%M"),
                    "end": closes.strftime("%H:%M"),
                    "timezone": "UTC",
                    "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                }
            },
        },
        timeouts=NEVER_TIMES_OUT,
    )
    rollout_id, handle = started
    state = await until(handle, lambda s: s.status_reason == "OUTSIDE_MAINTENANCE_WINDOW")
    assert state.status == "running" and state.stage == "canary"
    assert state.waiting_for == f"the maintenance window, opening at {opens.isoformat()}".replace(
        "+00:00", "Z"
    )
    row = await fetch_one(
        sessions, "SELECT status_reason, notified FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert row == {"status_reason": "OUTSIDE_MAINTENANCE_WINDOW", "notified": 0}
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed" and result.counts.notified == 60
    first = await fetch_one(
        sessions,
        "SELECT min(notified_at) AS first FROM rollout_targets WHERE rollout_id = :r",
        r=rollout_id,
    )
    assert opens <= first["first"] < closes
