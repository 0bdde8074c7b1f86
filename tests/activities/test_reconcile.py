"""The reconcile's pass over the blocked vehicles of completed rollouts
(`ReconcileActivities.recheck_completed_rollouts`), against real PostgreSQL: a vehicle the
server held back is notified once a heartbeat passes, inside its rollout's window only."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text
from temporalio.testing import ActivityEnvironment

from activities.reconcile import ReconcileActivities
from activities.rollouts import RolloutActivities
from core.db import session_scope
from models.workflows import ExpandTargetsInput, IssueStageInput, RecheckCompletedInput
from services.rollouts.issue import target_set_desired_state_id
from tests.factories import (
    OLD_RELEASE,
    Sessions,
    fetch_one,
    fleet_rollout,
    stage_vehicles,
    strategy,
)

RELEASE = "2026.2.0-rc"
WINDOW = {"start": "01:00", "end": "05:00", "timezone": "UTC"}
INSIDE = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
OUTSIDE = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


async def _sql(sessions: Sessions, sql: str, **params: object) -> None:
    async with session_scope(sessions) as session:
        await (await session.connection()).execute(text(sql), params)


async def _held(sessions: Sessions, rollout_id: int, vehicle_id: str) -> tuple[object, ...]:
    row = await fetch_one(
        sessions,
        "SELECT t.state, t.reason_code, v.status, v.desired_release_version,"
        " v.desired_state_id, v.rollout_id, r.blocked"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " JOIN rollouts r ON r.id = t.rollout_id"
        " WHERE t.rollout_id = :r AND t.vehicle_id = :v",
        r=rollout_id,
        v=vehicle_id,
    )
    return tuple(row.values())


async def test_blocked_vehicles_of_a_completed_rollout_are_notified_inside_its_window(
    sessions: Sessions,
) -> None:
    rollout_id, _ = await fleet_rollout(
        sessions,
        name="rc",
        vehicles=20,
        release=RELEASE,
        strategy=strategy(canary_size=4, waves=[{"percent": 100, "bakeSeconds": 0}]),
        gates={
            "safetyChecks": {
                "minBatteryPercent": 30,
                "requireStationary": True,
                "maintenanceWindow": WINDOW,
            }
        },
    )
    rollouts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    await env.run(rollouts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await _sql(sessions, "UPDATE vehicles SET battery_percent = 10 WHERE id = :v", v=canary[0])
    issued = await env.run(
        rollouts.issue_stage,
        IssueStageInput(
            rollout_id=rollout_id, release_version=RELEASE, stage_index=0, stage="canary"
        ),
    )
    assert (issued.issued, issued.counts.blocked) == (len(canary) - 1, 1)
    await _sql(sessions, "UPDATE rollouts SET status = 'completed' WHERE id = :r", r=rollout_id)
    held = ("blocked", "BATTERY_LOW", "blocked", OLD_RELEASE, None, None, 1)
    assert await _held(sessions, rollout_id, canary[0]) == held

    reconcile = ReconcileActivities(sessions)
    # A heartbeat that passes arrives; outside the window nothing is issued.
    await _sql(
        sessions,
        "UPDATE vehicles SET battery_percent = 70, last_seen_at = now() WHERE id = :v",
        v=canary[0],
    )
    closed = await env.run(reconcile.recheck_completed_rollouts, RecheckCompletedInput(now=OUTSIDE))
    assert closed.outside_window >= 1
    assert await _held(sessions, rollout_id, canary[0]) == held
    # Inside it, the vehicle gets the stage's desired state.
    opened = await env.run(reconcile.recheck_completed_rollouts, RecheckCompletedInput(now=INSIDE))
    assert opened.changed >= 1
    assert await _held(sessions, rollout_id, canary[0]) == (
        "notified",
        None,
        "pending",
        RELEASE,
        target_set_desired_state_id(rollout_id, "stage:0"),
        rollout_id,
        0,
    )
