"""RolloutWorkflow's rollbacks on the time-skipping server, with the real activities over
PostgreSQL: a failure threshold whose action is rollback, and the staged rollback gated by the
failure threshold over its own outcomes. (An operator's rollback of a rollout whose vehicles
report nothing: test_rollout.py.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from models.workflows import RolloutResult, RolloutSignal
from tests.factories import OLD_RELEASE, Sessions, fetch_all, fetch_one, stage_vehicles
from tests.workflows.conftest import (
    HOUR,
    NEVER_TIMES_OUT,
    RELEASE,
    StartRollout,
    audit_actions,
    baking,
    report,
    rollback_baking,
    rollback_settling,
    settling,
    through_healthy_canary,
    until,
)


async def test_failure_threshold_with_rollback_action_rolls_back(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "rollback"}},
        timeouts=NEVER_TIMES_OUT,
    )
    wave = await through_healthy_canary(time_skipping_env, handle, sessions, rollout_id)
    await report(sessions, rollout_id, wave[:2], "failed", "INSUFFICIENT_STORAGE", handle=handle)
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
    actions = await audit_actions(sessions, rollout_id)
    # The rollback is staged and baked (no vehicle has to report: none runs the new release).
    rollback = actions[actions.index("rollout.rollback_started") :]
    assert rollback[-1] == "rollout.rolled_back" and "rollout.rollback_stage" in rollback
    counters = await fetch_one(
        sessions, "SELECT succeeded, failed FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert counters == {"succeeded": 0, "failed": 0}


async def _applied(
    sessions: Sessions, handle: WorkflowHandle[Any, Any], rollout_id: int, vehicles: list[str]
) -> None:
    """The vehicles report ready for the new release and now run it."""
    await report(sessions, rollout_id, vehicles, "succeeded", handle=handle)
    async with session_scope(sessions) as session:
        await session.exec(  # type: ignore[call-overload]
            text("UPDATE vehicles SET actual_release_version = :v WHERE id = ANY(:ids)"),
            params={"v": RELEASE, "ids": vehicles},
        )


async def _rollback_started(
    env: WorkflowEnvironment,
    handle: WorkflowHandle[Any, RolloutResult],
    sessions: Sessions,
    rollout_id: int,
) -> tuple[list[str], list[str]]:
    """Canary and wave-1 applied (vehicles now run the new release), then an operator
    rollback while wave-1 bakes; returns (canary, wave-1) vehicles once wave-1's vehicles
    were sent back (its rollback settles once they report)."""
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await _applied(sessions, handle, rollout_id, canary)
    await until(handle, baking("canary"))
    await env.sleep(HOUR + 60)
    await until(handle, settling("wave-1"))
    wave = await stage_vehicles(sessions, rollout_id, 1)
    await _applied(sessions, handle, rollout_id, wave)
    await until(handle, baking("wave-1"))
    await handle.signal("rollback", RolloutSignal(reason="regression", actor="carol"))
    await until(handle, rollback_settling("wave-1"))
    return canary, wave


async def _rollback_rows(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    return await fetch_all(
        sessions,
        "SELECT t.stage, t.state, v.desired_release_version AS desired, count(*) AS n"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        r=rollout_id,
    )


async def test_rollback_of_applied_stages_ends_rolled_back_when_vehiclesreport(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    canary, wave = await _rollback_started(time_skipping_env, handle, sessions, rollout_id)
    # Wave-1 is back to the old desired state, waiting for its vehicles; the canary untouched.
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "succeeded", "desired": RELEASE, "n": 3},
        {"stage": 1, "state": "notified", "desired": OLD_RELEASE, "n": 27},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
    # ready for the rollback state: its rollback settles, then bakes
    await report(sessions, rollout_id, wave, "succeeded", handle=handle)
    await until(handle, rollback_baking("wave-1"))
    await time_skipping_env.sleep(400)  # past the rollback bake (min(bake, 300 s))
    await until(handle, rollback_settling("canary"))
    await report(sessions, rollout_id, canary, "succeeded", handle=handle)
    result = await handle.result()
    assert (result.status, result.status_reason) == ("rolled_back", "OPERATOR")
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "rolled_back", "desired": OLD_RELEASE, "n": 3},
        {"stage": 1, "state": "rolled_back", "desired": OLD_RELEASE, "n": 27},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]


async def test_failing_rollback_pauses_before_the_next_stage_until_resumed(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    rollout_id, handle = await rollout(
        gates={"failureThreshold": {"maxFailureRate": 0.05, "action": "pause"}},
        timeouts=NEVER_TIMES_OUT,
    )
    canary, wave = await _rollback_started(time_skipping_env, handle, sessions, rollout_id)
    # 5 of 27 fail to go back (18% > 5%): the rollback pauses itself, at once.
    await report(sessions, rollout_id, wave[:5], "failed", "INSUFFICIENT_STORAGE", handle=handle)
    state = await until(handle, lambda s: s.status == "paused")
    assert (state.status_reason, state.stage) == ("FAILURE_THRESHOLD", "wave-1")
    await report(sessions, rollout_id, wave[5:], "succeeded", handle=handle)
    await time_skipping_env.sleep(3 * HOUR)  # well past the rollback bake: still held
    row = await fetch_one(
        sessions, "SELECT status, status_reason FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert row == {"status": "paused", "status_reason": "FAILURE_THRESHOLD"}
    # The canary was not sent back: the bad return went no further.
    assert (await _rollback_rows(sessions, rollout_id))[0] == {
        "stage": 0,
        "state": "succeeded",
        "desired": RELEASE,
        "n": 3,
    }
    # A pause of the rollback is resumed (not rolled back again); it continues.
    await handle.signal("resume", RolloutSignal(reason="storage cleaned", actor="erin"))
    await until(handle, rollback_baking("wave-1"))  # settled while paused: it bakes now
    await time_skipping_env.sleep(400)
    await until(handle, rollback_settling("canary"))
    await report(sessions, rollout_id, canary, "succeeded", handle=handle)
    result = await handle.result()
    assert result.status == "rolled_back"
    assert await _rollback_rows(sessions, rollout_id) == [
        {"stage": 0, "state": "rolled_back", "desired": OLD_RELEASE, "n": 3},
        {"stage": 1, "state": "failed", "desired": OLD_RELEASE, "n": 5},
        {"stage": 1, "state": "rolled_back", "desired": OLD_RELEASE, "n": 22},
        {"stage": 2, "state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
    actions = await audit_actions(sessions, rollout_id)
    assert "rollout.rollback_gate_failed" in actions
    assert actions[-1] == "rollout.rolled_back"
