"""A stage is judged on what its vehicles reported, never on the clock alone (SPEC.md,
Rollouts): issue, settle, bake, judge. RolloutWorkflow on the time-skipping server with the
real activities over PostgreSQL; vehicles report through `record_target_outcomes` (the
telemetry path's entry point) and the workflow is signalled as the ingest path signals it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from core.temporal import OUTCOMES_SIGNAL
from models.workflows import OutcomesSignal, RolloutSignal
from tests.factories import OLD_RELEASE, Sessions, fetch_all, fetch_one, stage_vehicles
from tests.workflows.conftest import (
    GATE_INTERVAL,
    HOUR,
    NEVER_TIMES_OUT,
    RELEASE,
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


async def _stage_states(sessions: Sessions, rollout_id: int, stage: int) -> dict[str, int]:
    rows = await fetch_all(
        sessions,
        "SELECT state, count(*) AS n FROM rollout_targets WHERE rollout_id = :r AND stage = :s"
        " GROUP BY state",
        r=rollout_id,
        s=stage,
    )
    return {row["state"]: row["n"] for row in rows}


async def test_a_canary_whose_vehicles_report_after_its_bake_still_passes(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    # A 3-second canary bake, default gates (95% of at least 1 ready, at most 5% failed).
    started = await rollout(bakes=(3, 3, 0))
    rollout_id, handle = started
    await until(handle, settling("canary"))
    await time_skipping_env.sleep(20 * 60)  # the vehicles take 20 minutes to apply
    state = await until(handle, settling("canary"))
    assert state.status == "running" and not state.paused  # no false CANARY_UNHEALTHY
    assert await _stage_states(sessions, rollout_id, 1) == {"planned": 27}
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary, "succeeded", handle=handle)
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed" and result.counts.succeeded == 60
    actions = await audit_actions(sessions, rollout_id)
    assert "rollout.gate_failed" not in actions and "rollout.paused" not in actions


async def test_waves_wait_for_every_vehicle_and_completed_means_all_reported(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.5}}, timeouts=NEVER_TIMES_OUT
    )
    # wave-1: all but one vehicle report; hours later the wave is still settling and
    # wave-2 has not started.
    wave = await through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    await report(sessions, rollout_id, wave[:-1], "succeeded", handle=handle)
    await time_skipping_env.sleep(3 * HOUR)
    state = await until(handle, settling("wave-1"))
    assert state.waiting_for == "settle of wave-1: 1 of 27 vehicles still applying"
    assert await _stage_states(sessions, rollout_id, 2) == {"planned": 30}
    row = await fetch_one(sessions, "SELECT waiting_for FROM rollouts WHERE id = :r", r=rollout_id)
    assert row["waiting_for"] == state.waiting_for  # what the dashboard shows
    await report(sessions, rollout_id, wave[-1:], "succeeded", handle=handle)
    await until(handle, baking("wave-1"))
    await time_skipping_env.sleep(HOUR + 60)

    # wave-2, the last: one vehicle silent for hours, so the rollout is not completed...
    await until(handle, settling("wave-2"))
    last = await stage_vehicles(sessions, rollout_id, 2)
    await report(sessions, rollout_id, last[:-1], "succeeded", handle=handle)
    await time_skipping_env.sleep(5 * HOUR)
    state = await until(handle, settling("wave-2"))
    assert state.status == "running"
    # ...until it reports (a failure is an outcome too; 1 of 60 is under the threshold).
    await report(sessions, rollout_id, last[-1:], "failed", "SIGNATURE_INVALID", handle=handle)
    result = await handle.result()
    assert result.status == "completed"
    assert (result.counts.succeeded, result.counts.failed, result.counts.updating) == (59, 1, 0)
    states = {(r["state"], r["reason_code"]) for r in await target_states(sessions, rollout_id)}
    assert states == {("succeeded", None), ("failed", "SIGNATURE_INVALID")}


async def test_a_failure_after_the_stage_settled_pauses_it_during_its_bake(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={
            "canaryHealthy": {"minSuccessRate": 0.5, "minSamples": 1},
            "failureThreshold": {"maxFailureRate": 0.1},
        },
        timeouts=NEVER_TIMES_OUT,
    )
    wave = await through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    # 23 ready, 4 blocked (an outcome): wave-1 settles and bakes.
    await report(sessions, rollout_id, wave[4:], "succeeded", handle=handle)
    await report(sessions, rollout_id, wave[:4], "blocked", "NOT_STATIONARY", handle=handle)
    await until(handle, baking("wave-1"))
    # Inside the bake the blocked vehicles try again and fail: 4 of 30 (13% > 10%).
    await report(sessions, rollout_id, wave[:4], "failed", "SIGNATURE_INVALID", handle=handle)
    state = await until(handle, lambda s: s.status == "paused")
    assert (state.status_reason, state.stage, state.phase) == (
        "FAILURE_THRESHOLD",
        "wave-1",
        "bake",
    )
    assert await _stage_states(sessions, rollout_id, 2) == {"planned": 30}
    await handle.signal("abort", RolloutSignal(reason="bad modems", actor="ivy"))
    assert (await handle.result()).status == "aborted"


async def test_a_breach_stops_issuing_between_batches(
    time_skipping_env: WorkflowEnvironment,
    rollout: StartRollout,
    sessions: Sessions,
    engine: AsyncEngine,
) -> None:
    started = await rollout(
        bakes=(2, HOUR, HOUR),
        gates={
            "canaryHealthy": {"minSuccessRate": 0, "minSamples": 0},
            "failureThreshold": {"maxFailureRate": 0.2},
        },
        timeouts=NEVER_TIMES_OUT,
        issue_batch_size=5,
    )
    rollout_id, handle = started
    await until(handle, settling("canary"))  # the targets are planned
    wave = sorted(await stage_vehicles(sessions, rollout_id, 1))
    # Hold wave-1's second batch at its first vehicle (a row lock) while the first batch's
    # vehicles fail: the issue must stop right after the second batch.
    async with engine.connect() as blocker:
        transaction = await blocker.begin()
        await blocker.execute(
            text("SELECT 1 FROM vehicles WHERE id = :v FOR UPDATE"), {"v": wave[5]}
        )
        canary = await stage_vehicles(sessions, rollout_id, 0)
        await report(sessions, rollout_id, canary, "succeeded", handle=handle)
        await eventually(
            lambda: _stage_states(sessions, rollout_id, 1),
            lambda states: states.get("notified") == 5,
        )
        first = wave[:5]
        await report(sessions, rollout_id, first, "failed", "SIGNATURE_INVALID", handle=handle)
        await transaction.rollback()
    state = await until(handle, lambda s: s.status == "paused")
    assert (state.status_reason, state.stage) == ("FAILURE_THRESHOLD", "wave-1")
    assert await _stage_states(sessions, rollout_id, 1) == {
        "failed": 5,
        "notified": 5,
        "planned": 17,
    }
    await asyncio.sleep(0.5)  # nothing more is issued while it is held
    assert (await _stage_states(sessions, rollout_id, 1))["planned"] == 17
    actions = await audit_actions(sessions, rollout_id)
    assert actions[-1] == "rollout.gate_failed"

    # Resume acknowledges the 5 failures; the rest of the stage is issued.
    await handle.signal("resume", RolloutSignal(reason="bad batch", actor="jo"))
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed" and result.counts.failed == 5
    assert result.counts.succeeded == 55


async def test_nothing_is_issued_outside_the_window_retries_included(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    now = (await time_skipping_env.get_current_time()).astimezone(UTC)
    opens = (now + timedelta(minutes=10)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    started = await rollout(
        bakes=(60, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0, "minSamples": 0},
            "failureThreshold": {"maxFailureRate": 1},
            "safetyChecks": {
                "maintenanceWindow": {
                    "start": opens.strftime("%H:%M"),
                    "end": closes.strftime("%H:%M"),
                    "timezone": "UTC",
                }
            },
        },
        timeouts=NEVER_TIMES_OUT,
        # the first retry is due 90 minutes after the failure: the window has closed
        retry={"maxAttempts": 2, "backoffSeconds": 5400},
        gate_interval=1800,
    )
    rollout_id, handle = started
    await time_skipping_env.sleep(15 * 60)  # the window opens
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    failed_at = await time_skipping_env.get_current_time()
    await report(
        sessions,
        rollout_id,
        canary[:1],
        "failed",
        "NETWORK_UNREACHABLE",
        handle=handle,
        at=failed_at,
    )
    await report(sessions, rollout_id, canary[1:], "succeeded", handle=handle)
    async with reporting_fleet(sessions, started):
        result = await handle.result()
    assert result.status == "completed"
    issued = await fetch_all(
        sessions,
        "SELECT vehicle_id, attempt, notified_at FROM rollout_targets WHERE rollout_id = :r",
        r=rollout_id,
    )
    retried = [row for row in issued if row["attempt"] == 2]
    assert [row["vehicle_id"] for row in retried] == canary[:1]
    for row in issued:  # every issue, the retry included, inside an opening of the window
        at: datetime = row["notified_at"]
        assert (at - opens) % timedelta(days=1) < timedelta(hours=1), row
    assert retried[0]["notified_at"] >= opens + timedelta(days=1)  # the next day's window


async def test_vehicles_whose_heartbeat_fails_are_held_back_then_notified(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    async def low_batteries(prefix: str) -> None:
        await _heartbeat(sessions, f"{prefix}%", battery=10)

    started = await rollout(
        gates={
            "canaryHealthy": {"minSuccessRate": 0, "minSamples": 0},
            "failureThreshold": {"maxFailureRate": 1},
            "safetyChecks": {"minBatteryPercent": 40, "requireStationary": True},
        },
        timeouts=NEVER_TIMES_OUT,
        prepare=low_batteries,
    )
    rollout_id, handle = started
    # The canary's vehicles said 10%: none is notified; blocked is an outcome, so it settles.
    await until(handle, baking("canary"))
    canary = sorted(await stage_vehicles(sessions, rollout_id, 0))
    held = await fetch_all(
        sessions,
        "SELECT t.state, t.reason_code, t.notified_at, v.desired_release_version AS desired,"
        " v.status FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r AND t.stage = 0",
        r=rollout_id,
    )
    assert (
        held
        == [
            {
                "state": "blocked",
                "reason_code": "BATTERY_LOW",
                "notified_at": None,
                "desired": OLD_RELEASE,
                "status": "blocked",
            }
        ]
        * 3
    )
    await time_skipping_env.sleep(GATE_INTERVAL + 60)  # a gate tick: still held back
    assert await _stage_states(sessions, rollout_id, 0) == {"blocked": 3}

    # One charges and reports: the next gate tick notifies it (its desired state now names
    # the release); the others stay held back.
    await _heartbeat(sessions, canary[0], battery=85)
    async with reporting_fleet(sessions, started):
        await time_skipping_env.sleep(GATE_INTERVAL + 60)
        await eventually(
            lambda: _stage_states(sessions, rollout_id, 0),
            lambda states: states == {"blocked": 2, "succeeded": 1},
        )
    row = await fetch_one(
        sessions,
        "SELECT desired_release_version AS desired FROM vehicles WHERE id = :v",
        v=canary[0],
    )
    assert row["desired"] == RELEASE
    await handle.signal("abort", RolloutSignal(reason="test over", actor="kim"))
    assert (await handle.result()).status == "aborted"


async def _heartbeat(sessions: Sessions, vehicles: str, *, battery: int) -> None:
    """A fresh heartbeat, parked, at `battery`%, of the vehicles whose id is LIKE `vehicles`
    (as the ingest path leaves it on the vehicle's row)."""
    async with session_scope(sessions) as session:
        await (await session.connection()).execute(
            text(
                "UPDATE vehicles SET battery_percent = :b, stationary = true,"
                " last_seen_at = clock_timestamp() WHERE id LIKE :v"
            ),
            {"b": battery, "v": vehicles},
        )


async def test_a_stage_that_unsettles_in_its_bake_waits_past_it_without_spinning(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"canaryHealthy": {"minSuccessRate": 0, "minSamples": 0}},
        timeouts=NEVER_TIMES_OUT,
    )
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:2], "succeeded", handle=handle)
    await report(sessions, rollout_id, canary[2:], "blocked", "NOT_STATIONARY", handle=handle)
    await until(handle, baking("canary"))
    # The blocked one parks and starts applying: the canary is not settled any more.
    await report(sessions, rollout_id, canary[2:], "updating", handle=handle)
    await time_skipping_env.sleep(3 * HOUR)  # the bake ends meanwhile
    state = await until(handle, lambda s: s.stage == "canary" and s.phase == "bake")
    assert state.status == "running"
    assert await _stage_states(sessions, rollout_id, 1) == {"planned": 27}
    # It waited on its gate tick (every GATE_INTERVAL), not in a loop of evaluations.
    history = await handle.fetch_history()
    evaluations = sum(
        1
        for event in history.events
        if event.activity_task_scheduled_event_attributes.activity_type.name == "evaluate_gates"
    )
    assert evaluations <= 3 * HOUR // GATE_INTERVAL + 10, evaluations
    await report(sessions, rollout_id, canary[2:], "succeeded", handle=handle)
    await until(handle, settling("wave-1"))
    await handle.signal("abort", RolloutSignal(reason="test over", actor="lee"))
    assert (await handle.result()).status == "aborted"


async def test_a_held_rollout_continues_as_new_while_outcomes_keep_coming(
    rollout: StartRollout, sessions: Sessions
) -> None:
    handle = (await rollout(timeouts=NEVER_TIMES_OUT, continue_as_new_after=150)).handle
    await until(handle, settling("canary"))
    await handle.signal("pause", RolloutSignal(reason="hold", actor="max"))
    await until(handle, lambda s: s.status == "paused")
    for _ in range(60):  # the ingest path's signals while vehicles keep reporting
        await handle.signal(OUTCOMES_SIGNAL, OutcomesSignal(events=1))
    state = await until(handle, lambda s: s.runs > 1 and s.outcome_signals == 60)
    assert state.status == "paused" and state.paused and state.phase == "settle"
    await handle.signal("abort", RolloutSignal(reason="test over", actor="max"))
    assert (await handle.result()).status == "aborted"
