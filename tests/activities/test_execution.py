"""Per-vehicle outcomes, gate counts, apply timeouts, retries and blocked rechecks: the
services and activities against real PostgreSQL (ActivityEnvironment)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.testing import ActivityEnvironment

from activities.rollouts import RolloutActivities
from core.db import session_scope
from models.workflows import (
    EvaluateGatesInput,
    ExpandTargetsInput,
    IssueStageInput,
    RollbackTargetsInput,
    TargetSweepInput,
)
from services.rollouts.outcomes import record_target_outcomes
from tests.factories import (
    OLD_RELEASE,
    Sessions,
    fetch_all,
    fetch_one,
    fleet_rollout,
    stage_vehicles,
    strategy,
)

NEW_RELEASE = "2026.2.0-exec"
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
COUNTERS = (
    "SELECT notified, updating, succeeded, failed, blocked, pending FROM rollouts WHERE id = :r"
)


async def _set_json(sessions: Sessions, rollout_id: int, column: str, value: Any) -> None:
    async with session_scope(sessions) as session:
        conn = await session.connection()
        await conn.execute(
            text(f"UPDATE rollouts SET {column} = CAST(:v AS jsonb) WHERE id = :r"),
            {"v": json.dumps(value), "r": rollout_id},
        )


@pytest.fixture
async def issued(sessions: Sessions) -> tuple[int, list[str]]:
    """A rollout over 20 vehicles, canary of 10 issued at T0; returns its id and canary ids."""
    rollout_id, _ = await fleet_rollout(
        sessions,
        name="ex",
        vehicles=40,
        release=NEW_RELEASE,
        strategy=strategy(canary_size=10, waves=[{"percent": 100, "bakeSeconds": 60}]),
    )
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    await env.run(
        acts.issue_stage,
        IssueStageInput(
            rollout_id=rollout_id,
            release_version=NEW_RELEASE,
            stage_index=0,
            stage="canary",
            issued_at=T0,
        ),
    )
    return rollout_id, await stage_vehicles(sessions, rollout_id, 0)


async def _record(sessions: Sessions, rollout_id: int, outcomes: Any, at: Any = None) -> int:
    async with session_scope(sessions) as session:
        return await record_target_outcomes(
            session, rollout_id=rollout_id, outcomes=outcomes, at=at
        )


async def _targets(sessions: Sessions, rollout_id: int) -> dict[str, tuple[str, Any, int]]:
    rows = await fetch_all(
        sessions,
        "SELECT vehicle_id, state, reason_code, attempt FROM rollout_targets"
        " WHERE rollout_id = :r AND stage = 0",
        r=rollout_id,
    )
    return {r["vehicle_id"]: (r["state"], r["reason_code"], r["attempt"]) for r in rows}


async def _heartbeat(sessions: Sessions, beats: list[dict[str, Any]]) -> None:
    """Each vehicle `v` reports battery `b` and stationary `s`, a second from now (newer than
    any report before it)."""
    async with session_scope(sessions) as session:
        conn = await session.connection()
        await conn.execute(
            text(
                "UPDATE vehicles SET battery_percent = :b, stationary = :s,"
                " last_seen_at = now() + interval '1 second' WHERE id = :v"
            ),
            beats,
        )


def _sweep_at(rollout_id: int, seconds: int) -> TargetSweepInput:
    """A sweep of the rollout's targets `seconds` after its canary was issued (T0)."""
    return TargetSweepInput(rollout_id=rollout_id, now=T0 + timedelta(seconds=seconds))


async def _retried_target(sessions: Sessions, rollout_id: int, vehicle_id: str) -> dict[str, Any]:
    """The desired state a retry issued to the vehicle, and what its target row keeps."""
    return await fetch_one(
        sessions,
        """
        SELECT t.desired_state_id = v.desired_state_id AS current, d.release_version,
               d.vehicle_id IS NULL AS target_set, d.reason,
               t.previous_release_version, t.notified_at
        FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id
        JOIN desired_states d ON d.id = t.desired_state_id
        WHERE t.rollout_id = :r AND t.vehicle_id = :v
        """,
        r=rollout_id,
        v=vehicle_id,
    )


async def test_outcomes_move_states_and_counters(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    rollout_id, v = issued
    moved = await _record(
        sessions,
        rollout_id,
        [
            (v[0], "updating", None),
            (v[1], "succeeded", None),
            (v[2], "failed", "APPLY_FAILED"),
            (v[3], "blocked", "BATTERY_LOW"),
            (v[4], "updating", None),
            (v[4], "succeeded", None),  # the last outcome of a vehicle wins
            ("not-in-rollout", "succeeded", None),
        ],
    )
    assert moved == 5
    assert await fetch_one(sessions, COUNTERS, r=rollout_id) == {
        "notified": 10,
        "updating": 1,
        "succeeded": 2,
        "failed": 1,
        "blocked": 1,
        "pending": 10,
    }
    # Same again: nothing moves. Succeeded is final. Updating -> succeeded moves counters.
    assert await _record(sessions, rollout_id, [(v[2], "failed", "APPLY_FAILED")]) == 0
    assert await _record(sessions, rollout_id, [(v[1], "failed", "APPLY_FAILED")]) == 0
    assert (
        await _record(
            sessions,
            rollout_id,
            [(v[0], "succeeded", "IGNORED"), (v[3], "updating", None), (v[2], "failed", "X")],
        )
        == 3
    )
    targets = await _targets(sessions, rollout_id)
    assert targets[v[0]] == ("succeeded", None, 1)
    assert targets[v[2]] == ("failed", "X", 1)
    assert await fetch_one(sessions, COUNTERS, r=rollout_id) == {
        "notified": 10,
        "updating": 1,
        "succeeded": 3,
        "failed": 1,
        "blocked": 0,
        "pending": 10,
    }
    # Counters equal a recount.
    recount = await fetch_all(
        sessions,
        "SELECT state, count(*) AS n FROM rollout_targets WHERE rollout_id = :r GROUP BY state",
        r=rollout_id,
    )
    assert {r["state"]: r["n"] for r in recount} == {
        "notified": 5,
        "updating": 1,
        "succeeded": 3,
        "failed": 1,
        "planned": 10,
    }
    with pytest.raises(ValueError, match="unknown outcome state"):
        await _record(sessions, rollout_id, [(v[0], "ready", None)])


async def test_evaluate_gates_counts_and_decides(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    rollout_id, v = issued
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    gate = EvaluateGatesInput(rollout_id=rollout_id, stage_index=0, is_canary=True, bake_done=True)
    # Nobody reported: not settled, so not judged (however long the bake was).
    result = await env.run(acts.evaluate_gates, gate)
    assert result.stage.notified == 10 and result.total.issued == 10
    assert (result.settled, result.unsettled) == (False, 10)
    assert (result.decision.action, result.decision.reason) == ("wait", None)
    assert result.decision.detail == "10 of 10 vehicles still applying"
    # Blocked is an outcome without a sample: 1 of 1 reported ready is not enough.
    await _record(sessions, rollout_id, [(x, "blocked", "BATTERY_LOW") for x in v[1:]])
    await _record(sessions, rollout_id, [(v[1], "succeeded", None)])
    result = await env.run(acts.evaluate_gates, gate)
    assert result.settled is False and result.unsettled == 1
    await _record(sessions, rollout_id, [(v[0], "blocked", "BATTERY_LOW")])
    result = await env.run(acts.evaluate_gates, gate)
    assert result.settled is True
    assert (result.decision.action, result.decision.reason) == ("proceed", None)
    await _set_json(sessions, rollout_id, "gates", {"canaryHealthy": {"minSamples": 2}})
    result = await env.run(acts.evaluate_gates, gate)
    assert (result.decision.action, result.decision.reason) == ("pause", "CANARY_UNHEALTHY")
    await _record(sessions, rollout_id, [(x, "succeeded", None) for x in v[1:]])
    result = await env.run(acts.evaluate_gates, gate)
    assert result.decision.action == "proceed" and result.stage.succeeded == 9
    assert result.counts.succeeded == 9
    # One failure out of 10 breaches the default 5%: pause, or rollback when configured.
    await _record(sessions, rollout_id, [(v[0], "failed", "APPLY_FAILED")])
    await _set_json(
        sessions,
        rollout_id,
        "gates",
        {"failureThreshold": {"maxFailureRate": 0.05, "action": "rollback"}},
    )
    result = await env.run(acts.evaluate_gates, gate.model_copy(update={"bake_done": False}))
    assert (result.decision.action, result.decision.reason) == ("rollback", "FAILURE_THRESHOLD")
    assert result.total.failed == 1 and result.total.retryable == 1
    # ...unless an operator acknowledged that failure.
    acked = gate.model_copy(update={"bake_done": False, "acknowledged_failed": 1})
    assert (await env.run(acts.evaluate_gates, acked)).decision.action == "wait"


async def test_apply_timeout_then_retry_then_no_retry_for_signature_invalid(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    rollout_id, v = issued
    await _set_json(sessions, rollout_id, "timeouts", {"applySeconds": 600})
    await _set_json(sessions, rollout_id, "retry", {"maxAttempts": 2, "backoffSeconds": 60})
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    await _record(
        sessions,
        rollout_id,
        [
            (v[0], "succeeded", None),
            (v[1], "updating", None),
            (v[2], "failed", "SIGNATURE_INVALID"),
            (v[3], "failed", "NETWORK_UNREACHABLE"),
        ],
        at=T0 + timedelta(seconds=30),
    )
    # Not yet: 599 s after the issue.
    early = await env.run(acts.expire_apply_timeouts, _sweep_at(rollout_id, 599))
    assert early.changed == 0
    expired = await env.run(acts.expire_apply_timeouts, _sweep_at(rollout_id, 600))
    # notified (6) and updating (1) time out; succeeded and failed do not.
    assert expired.changed == 7
    assert expired.counts.failed == 9 and expired.counts.updating == 0
    targets = await _targets(sessions, rollout_id)
    assert targets[v[1]] == ("failed", "APPLY_TIMEOUT", 1)

    # Retry: backoff from the failure (60 s for attempt 1). NETWORK_UNREACHABLE failed at
    # T0+30 s -> due at T0+90 s; the timeouts failed at T0+600 s -> due at T0+660 s.
    first = await env.run(acts.retry_failed_targets, _sweep_at(rollout_id, 100))
    assert first.changed == 1
    second = await env.run(acts.retry_failed_targets, _sweep_at(rollout_id, 700))
    assert second.changed == 7 and second.counts.failed == 1  # SIGNATURE_INVALID stays
    again = await env.run(acts.retry_failed_targets, _sweep_at(rollout_id, 700))
    assert again.changed == 0  # idempotent
    targets = await _targets(sessions, rollout_id)
    assert targets[v[2]] == ("failed", "SIGNATURE_INVALID", 1)
    assert targets[v[3]] == ("notified", None, 2)
    assert await _retried_target(sessions, rollout_id, v[3]) == {
        "current": True,
        "release_version": NEW_RELEASE,
        # a new desired state for every vehicle's 2nd attempt, not the stage's first one
        "target_set": True,
        "reason": f"retry 2 of rollout {rollout_id}",
        "previous_release_version": OLD_RELEASE,
        "notified_at": T0 + timedelta(seconds=100),
    }
    # Attempt 2 of 2 fails again: no third issue.
    await _record(sessions, rollout_id, [(v[3], "failed", "APPLY_FAILED")], at=T0)
    last = await env.run(acts.retry_failed_targets, _sweep_at(rollout_id, 24 * 3600))  # a day on
    assert last.changed == 0


async def test_blocked_vehicle_is_reissued_when_it_passes_the_checks(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    rollout_id, v = issued
    await _set_json(
        sessions,
        rollout_id,
        "gates",
        {"safetyChecks": {"requireStationary": True, "minBatteryPercent": 40}},
    )
    await _record(
        sessions,
        rollout_id,
        [(v[0], "blocked", "BATTERY_LOW"), (v[1], "blocked", "NOT_STATIONARY")],
    )
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    now = datetime.now(UTC) + timedelta(minutes=1)
    assert (
        await env.run(acts.recheck_blocked, TargetSweepInput(rollout_id=rollout_id, now=now))
    ).changed == 0
    await _heartbeat(sessions, [{"v": v[0], "b": 80, "s": True}, {"v": v[1], "b": 80, "s": False}])
    result = await env.run(acts.recheck_blocked, TargetSweepInput(rollout_id=rollout_id, now=now))
    assert result.changed == 1 and result.counts.blocked == 1
    targets = await _targets(sessions, rollout_id)
    assert targets[v[0]] == ("notified", None, 1)
    assert targets[v[1]] == ("blocked", "NOT_STATIONARY", 1)


async def test_a_vehicle_notified_again_after_a_block_does_not_hold_the_settle(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    """The soak's moving fleet: a blocked vehicle that passes the re-check is `notified`
    again, and the stage stays settled (the full count and the quick look alike) while it
    applies; a failure counts at once, and a retry is waited for (it clears the mark)."""
    rollout_id, v = issued
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    gate = EvaluateGatesInput(rollout_id=rollout_id, stage_index=0, is_canary=True, bake_done=True)
    quick = gate.model_copy(update={"quick": True})

    async def rechecked() -> tuple[int, bool]:
        row = await fetch_one(
            sessions,
            "SELECT r.rechecked AS counter, t.rechecked AS mark FROM rollouts r"
            " JOIN rollout_targets t ON t.rollout_id = r.id AND t.vehicle_id = :v"
            " WHERE r.id = :r",
            r=rollout_id,
            v=v[0],
        )
        return row["counter"], row["mark"]

    await _record(sessions, rollout_id, [(x, "succeeded", None) for x in v[1:]])
    await _record(sessions, rollout_id, [(v[0], "blocked", "BATTERY_LOW")])
    assert (await env.run(acts.evaluate_gates, gate)).settled is True
    await _heartbeat(sessions, [{"v": v[0], "b": 80, "s": True}])
    now = datetime.now(UTC) + timedelta(minutes=1)
    swept = await env.run(acts.recheck_blocked, TargetSweepInput(rollout_id=rollout_id, now=now))
    assert swept.changed == 1 and (await _targets(sessions, rollout_id))[v[0]][0] == "notified"
    assert await rechecked() == (1, True)
    full = await env.run(acts.evaluate_gates, gate)
    assert (full.stage.notified, full.stage.rechecked) == (1, 1)
    assert (full.settled, full.unsettled, full.decision.action) == (True, 0, "proceed")
    looked = await env.run(acts.evaluate_gates, quick)
    assert (looked.stage_counted, looked.settled) == (True, True)
    assert (looked.total.notified, looked.total.rechecked) == (1, 1)
    # It begins to apply: still not waited for, by either.
    await _record(sessions, rollout_id, [(v[0], "updating", None)])
    assert await rechecked() == (1, True)
    full = await env.run(acts.evaluate_gates, gate)
    assert (full.stage.updating, full.stage.rechecked) == (1, 1)
    assert (full.settled, full.unsettled, full.decision.action) == (True, 0, "proceed")
    assert (await env.run(acts.evaluate_gates, quick)).stage_counted is True
    # It fails (retryable): the failure counts, and its retry is waited for.
    await _record(sessions, rollout_id, [(v[0], "failed", "APPLY_FAILED")])
    assert await rechecked() == (0, True)
    full = await env.run(acts.evaluate_gates, gate)
    assert (full.stage.failed, full.stage.retryable, full.unsettled) == (1, 1, 1)
    later = TargetSweepInput(rollout_id=rollout_id, now=datetime.now(UTC) + timedelta(hours=2))
    assert (await env.run(acts.retry_failed_targets, later)).changed == 1
    assert await rechecked() == (0, False)
    full = await env.run(acts.evaluate_gates, gate)
    assert (full.stage.notified, full.stage.rechecked, full.unsettled) == (1, 0, 1)
    assert (await env.run(acts.evaluate_gates, quick)).stage_counted is False


async def test_staged_rollback_moves_counters(
    sessions: Sessions, issued: tuple[int, list[str]]
) -> None:
    rollout_id, v = issued
    await _record(
        sessions, rollout_id, [(v[0], "failed", "APPLY_FAILED"), (v[1], "succeeded", None)]
    )
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    wave = await env.run(
        acts.rollback_targets, RollbackTargetsInput(rollout_id=rollout_id, stage_index=1)
    )
    assert wave.reverted == 0 and wave.skipped == 10
    canary = await env.run(
        acts.rollback_targets, RollbackTargetsInput(rollout_id=rollout_id, stage_index=0)
    )
    assert canary.reverted == 10
    assert canary.counts.failed == 0 and canary.counts.succeeded == 0


async def test_issuing_stops_between_batches_once_the_window_has_closed(
    sessions: Sessions,
) -> None:
    rollout_id, _ = await fleet_rollout(
        sessions,
        name="wn",
        vehicles=40,
        release=NEW_RELEASE,
        strategy=strategy(canary_size=2, waves=[{"percent": 100, "bakeSeconds": 60}]),
    )
    # Open 11:00-12:00 UTC every day; the issue began at 12:00:00, as it closed.
    window = {"start": "11:00", "end": "12:00", "timezone": "UTC"}
    await _set_json(sessions, rollout_id, "gates", {"safetyChecks": {"maintenanceWindow": window}})
    acts = RolloutActivities(sessions)
    env = ActivityEnvironment()
    await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    wave = IssueStageInput(
        rollout_id=rollout_id,
        release_version=NEW_RELEASE,
        stage_index=1,
        stage="wave-1",
        batch_size=5,
        issued_at=T0,
    )
    result = await env.run(acts.issue_stage, wave)
    assert result.issued == 5 and result.batches == 1  # the first batch, then it stopped
    assert result.halted is not None
    assert result.halted.reason == "OUTSIDE_MAINTENANCE_WINDOW"
    targeted = result.counts.targeted
    assert result.counts.pending == targeted - 5  # the rest of the stage (and the canary)
    # Inside the window it goes on to the end.
    inside = await env.run(
        acts.issue_stage, wave.model_copy(update={"issued_at": T0 - timedelta(minutes=30)})
    )
    assert inside.halted is None and inside.issued == targeted - 2 - 5
