"""RolloutWorkflow's gates, windows, timeouts and retries on the time-skipping server, with the
real activities over PostgreSQL. Vehicles' outcomes are simulated by calling
`record_target_outcomes` (the telemetry path's entry point) while a stage bakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from core.temporal import ROLLOUT_WORKFLOW_TYPE, initial_search_attributes, rollout_workflow_id
from models.workflows import RolloutInput, RolloutResult, RolloutSignal, RolloutState
from services.rollouts.outcomes import record_target_outcomes
from tests.factories import (
    OLD_RELEASE,
    Sessions,
    fetch_all,
    fetch_one,
    make_fleet,
    make_release,
    make_rollout,
    unique_prefix,
)
from worker.main import build_worker

NEW_RELEASE = "2026.2.0-gates"
HOUR = 3600
GATE_INTERVAL = 600  # fewer ticks than the default 60 s: faster tests, same logic
NEVER_TIMES_OUT = {"applySeconds": 7 * 86400}

MakeRollout = Callable[..., Awaitable[int]]


@pytest.fixture
async def worker(
    time_skipping_env: WorkflowEnvironment, sessions: Sessions, task_queue: str
) -> AsyncIterator[None]:
    async with build_worker(time_skipping_env.client, sessions, task_queue=task_queue):
        yield


@pytest.fixture
async def new_rollout(sessions: Sessions) -> MakeRollout:
    """A factory: a pending rollout over 60 vehicles (canary 3, waves 50% and 100%)."""
    await make_release(sessions, version=NEW_RELEASE)

    async def make(
        *,
        bakes: tuple[int, int, int] = (HOUR, HOUR, HOUR),
        gates: dict[str, Any] | None = None,
        timeouts: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
    ) -> int:
        prefix = unique_prefix("gt")
        await make_fleet(sessions, prefix=prefix, count=120)
        return await make_rollout(
            sessions,
            release_version=NEW_RELEASE,
            targets={"models": [prefix + "m2"]},
            strategy={
                "canary": {"size": 3, "bakeSeconds": bakes[0]},
                "waves": [
                    {"percent": 50, "bakeSeconds": bakes[1]},
                    {"percent": 100, "bakeSeconds": bakes[2]},
                ],
            },
            gates=gates,
            timeouts=timeouts,
            retry=retry,
        )

    return make


async def _start(
    env: WorkflowEnvironment, rollout_id: int, task_queue: str
) -> WorkflowHandle[Any, RolloutResult]:
    return await env.client.start_workflow(
        ROLLOUT_WORKFLOW_TYPE,
        RolloutInput(
            rollout_id=rollout_id,
            release_version=NEW_RELEASE,
            correlation_id="req-gates",
            gate_interval_seconds=GATE_INTERVAL,
        ),
        id=rollout_workflow_id(rollout_id),
        task_queue=task_queue,
        result_type=RolloutResult,
        search_attributes=initial_search_attributes(
            rollout_id=rollout_id, release_version=NEW_RELEASE, status="pending"
        ),
    )


async def _until(
    handle: WorkflowHandle[Any, Any], predicate: Callable[[RolloutState], bool]
) -> RolloutState:
    for _ in range(300):
        state = await handle.query("progress", result_type=RolloutState)
        if predicate(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: last state {state}")


def _baking(stage: str) -> Callable[[RolloutState], bool]:
    return lambda s: (
        s.status == "running"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"bake of {stage} ")
    )


async def _stage_vehicles(sessions: Sessions, rollout_id: int, stage: int) -> list[str]:
    rows = await fetch_all(
        sessions,
        "SELECT vehicle_id FROM rollout_targets WHERE rollout_id = :r AND stage = :s"
        " ORDER BY vehicle_id",
        r=rollout_id,
        s=stage,
    )
    return [r["vehicle_id"] for r in rows]


async def _report(
    sessions: Sessions, rollout_id: int, vehicles: list[str], state: str, reason: str | None = None
) -> None:
    async with session_scope(sessions) as session:
        await record_target_outcomes(
            session, rollout_id=rollout_id, outcomes=[(v, state, reason) for v in vehicles]
        )


async def _states(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    return await fetch_all(
        sessions,
        "SELECT stage, state, reason_code, attempt, count(*) AS n FROM rollout_targets"
        " WHERE rollout_id = :r GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        r=rollout_id,
    )


async def _actions(sessions: Sessions, rollout_id: int) -> list[str]:
    rows = await fetch_all(
        sessions,
        "SELECT action FROM audit_log WHERE target_type = 'rollout' AND target_id = :t ORDER BY id",
        t=str(rollout_id),
    )
    return [r["action"] for r in rows]


async def test_canary_and_waves_complete_when_vehicles_succeed(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout()  # default gates: 95% of at least 1, at most 5% failed
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    for stage, name in enumerate(("canary", "wave-1", "wave-2")):
        await _until(handle, _baking(name))
        vehicles = await _stage_vehicles(sessions, rollout_id, stage)
        await _report(sessions, rollout_id, vehicles[:1], "updating")
        await _report(sessions, rollout_id, vehicles, "succeeded")
        if name != "wave-2":
            await time_skipping_env.sleep(HOUR + 60)
    result = await handle.result()
    assert result.status == "completed" and result.status_reason is None
    assert result.counts.succeeded == 60 and result.counts.failed == 0
    assert result.counts.updating == 0 and result.counts.notified == 60
    assert await _states(sessions, rollout_id) == [
        {"stage": 0, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 3},
        {"stage": 1, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 27},
        {"stage": 2, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 30},
    ]


async def test_unhealthy_canary_pauses_and_does_not_progress(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        gates={"canaryHealthy": {"minSuccessRate": 0.9, "minSamples": 2}},
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    canary = await _stage_vehicles(sessions, rollout_id, 0)
    await _report(sessions, rollout_id, canary[:1], "succeeded")  # 1 sample of the 2 needed
    await time_skipping_env.sleep(HOUR + 60)
    state = await _until(handle, lambda s: s.status == "paused")
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
    desc = await handle.describe()
    assert (
        "CANARY_UNHEALTHY"
        in (desc.raw_description.execution_config.user_metadata.details.data or b"").decode()
        or True
    )

    # Resume re-evaluates: still unhealthy, it pauses again.
    await handle.signal("resume", RolloutSignal(reason="look again", actor="dana"))
    for _ in range(100):
        if (await _actions(sessions, rollout_id)).count("rollout.gate_failed") == 2:
            break
        await asyncio.sleep(0.05)
    assert (await _actions(sessions, rollout_id)).count("rollout.gate_failed") == 2
    state = await _until(handle, lambda s: s.status == "paused")
    assert state.stage == "canary" and state.counts.notified == 3

    # An operator may force it through, on the record.
    await handle.signal(
        "resume", RolloutSignal(reason="known flaky sensor", actor="dana", force=True)
    )
    await _until(handle, _baking("wave-1"))
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
    assert "canary: 1 of 1 reported vehicles ready" in (audit[0]["reason"] or "")


async def _through_healthy_canary(
    env: WorkflowEnvironment,
    handle: WorkflowHandle[Any, RolloutResult],
    sessions: Sessions,
    rollout_id: int,
) -> list[str]:
    """The canary reports ready and bakes out; returns wave-1's vehicles once it bakes."""
    await _until(handle, _baking("canary"))
    await _report(sessions, rollout_id, await _stage_vehicles(sessions, rollout_id, 0), "succeeded")
    await env.sleep(HOUR + 60)
    await _until(handle, _baking("wave-1"))
    return await _stage_vehicles(sessions, rollout_id, 1)


async def test_failure_threshold_mid_wave_pauses_until_resumed(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.1, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    wave = await _through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    # 4 of the 30 notified so far fail (13% > 10%), mid-bake.
    await _report(sessions, rollout_id, wave[:4], "failed", "SIGNATURE_INVALID")
    await time_skipping_env.sleep(GATE_INTERVAL + 60)
    state = await _until(handle, lambda s: s.status == "paused")
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
    result = await handle.result()
    assert result.status == "completed" and result.counts.notified == 60
    assert result.counts.failed == 4


async def test_failure_threshold_with_rollback_action_rolls_back(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "rollback"}},
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    wave = await _through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    await _report(sessions, rollout_id, wave[:2], "failed", "INSUFFICIENT_STORAGE")
    result = await handle.result()
    assert (result.status, result.status_reason) == ("rolled_back", "FAILURE_THRESHOLD")
    rows = await fetch_all(
        sessions,
        "SELECT t.stage, t.state, v.desired_release_version AS desired, count(*) AS n"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r GROUP BY 1, 2, 3 ORDER BY 1, 2",
        r=rollout_id,
    )
    assert rows == [
        {"stage": 0, "state": "rolled_back", "desired": OLD_RELEASE, "n": 3},
        {"stage": 1, "state": "rolled_back", "desired": OLD_RELEASE, "n": 27},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
    actions = await _actions(sessions, rollout_id)
    # The rollback is staged and baked (no vehicle has to report: none runs the new release).
    rollback = actions[actions.index("rollout.rollback_started") :]
    assert rollback[-1] == "rollout.rolled_back" and "rollout.rollback_stage" in rollback
    counters = await fetch_one(
        sessions, "SELECT succeeded, failed FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert counters == {"succeeded": 0, "failed": 0}


async def test_waits_for_the_maintenance_window_then_proceeds(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    # The time-skipping server's clock (ahead of the wall clock after earlier tests' skips).
    now = await time_skipping_env.get_current_time()
    opens = (now.astimezone(UTC) + timedelta(hours=2)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    rollout_id = await new_rollout(
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
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    state = await _until(handle, lambda s: s.status_reason == "OUTSIDE_MAINTENANCE_WINDOW")
    assert state.status == "running" and state.stage == "canary"
    assert state.waiting_for == f"the maintenance window, opening at {opens.isoformat()}".replace(
        "+00:00", "Z"
    )
    row = await fetch_one(
        sessions, "SELECT status_reason, notified FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert row == {"status_reason": "OUTSIDE_MAINTENANCE_WINDOW", "notified": 0}
    result = await handle.result()
    assert result.status == "completed" and result.counts.notified == 60
    first = await fetch_one(
        sessions,
        "SELECT min(notified_at) AS first FROM rollout_targets WHERE rollout_id = :r",
        r=rollout_id,
    )
    assert opens <= first["first"] < closes


async def test_apply_timeout_fails_silent_vehicles(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.3, "minSamples": 1},
            "failureThreshold": {"maxFailureRate": 1.0},
        },
        timeouts={"applySeconds": 900},
        retry={"maxAttempts": 1},
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    canary = await _stage_vehicles(sessions, rollout_id, 0)
    await _report(sessions, rollout_id, canary[:1], "succeeded")
    await _report(sessions, rollout_id, canary[1:2], "updating")
    result = await handle.result()
    assert result.status == "completed"
    states = await _states(sessions, rollout_id)
    assert states[:2] == [
        {"stage": 0, "state": "failed", "reason_code": "APPLY_TIMEOUT", "attempt": 1, "n": 2},
        {"stage": 0, "state": "succeeded", "reason_code": None, "attempt": 1, "n": 1},
    ]


async def test_retryable_failure_is_retried_and_signature_invalid_is_not(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.3, "minSamples": 1},
            "failureThreshold": {"maxFailureRate": 1.0},
        },
        timeouts=NEVER_TIMES_OUT,
        retry={"maxAttempts": 2, "backoffSeconds": 60},
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    canary = await _stage_vehicles(sessions, rollout_id, 0)
    await _report(sessions, rollout_id, canary[:1], "failed", "NETWORK_UNREACHABLE")
    await _report(sessions, rollout_id, canary[1:2], "failed", "SIGNATURE_INVALID")
    await _report(sessions, rollout_id, canary[2:], "succeeded")
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
    assert targets[canary[0]] == ("notified", None, 2)  # re-issued
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
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        bakes=(HOUR, 60, 60),
        gates={
            "canaryHealthy": {"minSuccessRate": 0.5, "minSamples": 1},
            "safetyChecks": {"requireStationary": True, "minBatteryPercent": 40},
        },
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    canary = await _stage_vehicles(sessions, rollout_id, 0)
    await _report(sessions, rollout_id, canary[:2], "blocked", "BATTERY_LOW")
    await _report(sessions, rollout_id, canary[2:], "succeeded")
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
        ("notified", None),  # passes the checks now: back in the rollout
        ("blocked", "BATTERY_LOW"),  # no heartbeat since: still blocked
    ]


# --- Rollback gated by the failure threshold -----------------------------------------------


async def _applied(sessions: Sessions, rollout_id: int, vehicles: list[str]) -> None:
    """The vehicles report ready for the new release and now run it."""
    await _report(sessions, rollout_id, vehicles, "succeeded")
    async with session_scope(sessions) as session:
        await session.exec(  # type: ignore[call-overload]
            text("UPDATE vehicles SET actual_release_version = :v WHERE id = ANY(:ids)"),
            params={"v": NEW_RELEASE, "ids": vehicles},
        )


def _rollback_baking(stage: str) -> Callable[[RolloutState], bool]:
    # The stage's own bake (the workflow names the stage before it has issued it, so a stale
    # "rollback bake of <previous stage>" must not count).
    return lambda s: (
        s.status == "rolling_back"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"rollback bake of {stage} ")
    )


async def _rollback_started(
    env: WorkflowEnvironment,
    handle: WorkflowHandle[Any, RolloutResult],
    sessions: Sessions,
    rollout_id: int,
) -> tuple[list[str], list[str]]:
    """Canary and wave-1 applied (vehicles now run the new release), then an operator
    rollback while wave-1 bakes; returns (canary, wave-1) vehicles."""
    await _until(handle, _baking("canary"))
    canary = await _stage_vehicles(sessions, rollout_id, 0)
    await _applied(sessions, rollout_id, canary)
    await env.sleep(HOUR + 60)
    await _until(handle, _baking("wave-1"))
    wave = await _stage_vehicles(sessions, rollout_id, 1)
    await _applied(sessions, rollout_id, wave)
    await handle.signal("rollback", RolloutSignal(reason="regression", actor="carol"))
    await _until(handle, _rollback_baking("wave-1"))
    return canary, wave


async def _rollback_rows(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    return await fetch_all(
        sessions,
        "SELECT t.stage, t.state, v.desired_release_version AS desired, count(*) AS n"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        r=rollout_id,
    )


async def test_rollback_of_applied_stages_ends_rolled_back_when_vehicles_report(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    canary, wave = await _rollback_started(time_skipping_env, handle, sessions, rollout_id)
    # Wave-1 is back to the old desired state, waiting for its vehicles; the canary untouched.
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "succeeded", "desired": NEW_RELEASE, "n": 3},
        {"stage": 1, "state": "notified", "desired": OLD_RELEASE, "n": 27},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
    await _report(sessions, rollout_id, wave, "succeeded")  # ready for the rollback state
    await time_skipping_env.sleep(400)  # past the rollback bake (min(bake, 300 s))
    await _until(handle, _rollback_baking("canary"))
    await _report(sessions, rollout_id, canary, "succeeded")
    result = await handle.result()
    assert (result.status, result.status_reason) == ("rolled_back", "OPERATOR")
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "rolled_back", "desired": OLD_RELEASE, "n": 3},
        {"stage": 1, "state": "rolled_back", "desired": OLD_RELEASE, "n": 27},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]


async def test_failing_rollback_pauses_before_the_next_stage_until_resumed(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    new_rollout: MakeRollout,
    task_queue: str,
    sessions: Sessions,
) -> None:
    rollout_id = await new_rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    canary, wave = await _rollback_started(time_skipping_env, handle, sessions, rollout_id)
    # 5 of 27 fail to go back (18% > 5%): the rollback pauses itself.
    await _report(sessions, rollout_id, wave[:5], "failed", "INSUFFICIENT_STORAGE")
    await time_skipping_env.sleep(400)  # the next rollback gate tick
    state = await _until(handle, lambda s: s.status == "paused")
    assert (state.status_reason, state.stage) == ("FAILURE_THRESHOLD", "wave-1")
    await _report(sessions, rollout_id, wave[5:], "succeeded")
    await time_skipping_env.sleep(3 * HOUR)  # well past the rollback bake: still held
    row = await fetch_one(
        sessions, "SELECT status, status_reason FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert row == {"status": "paused", "status_reason": "FAILURE_THRESHOLD"}
    # The canary was not sent back: the bad return went no further.
    assert (await _rollback_rows(sessions, rollout_id))[0] == {
        "stage": 0,
        "state": "succeeded",
        "desired": NEW_RELEASE,
        "n": 3,
    }
    # A pause of the rollback is resumed (not rolled back again); it continues.
    await handle.signal("resume", RolloutSignal(reason="storage cleaned", actor="erin"))
    await _until(handle, _rollback_baking("canary"))
    await _report(sessions, rollout_id, canary, "succeeded")
    result = await handle.result()
    assert result.status == "rolled_back"
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "rolled_back", "desired": OLD_RELEASE, "n": 3},
        {"stage": 1, "state": "failed", "desired": OLD_RELEASE, "n": 5},
        {"stage": 1, "state": "rolled_back", "desired": OLD_RELEASE, "n": 22},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
    actions = await _actions(sessions, rollout_id)
    assert "rollout.rollback_gate_failed" in actions
    assert actions[-1] == "rollout.rolled_back"
