"""Issuing a stage batch by batch, by its cursor, under the safety checks of the vehicles'
last heartbeats (services/rollouts/issue.py), and the re-check of the vehicles it held back
(services/rollouts/sweeps.py recheck_blocked)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from core.db import session_scope
from models.workflows import MaintenanceWindowSpec
from services.rollouts import issue, outcomes, plan, queries, sweeps
from services.safety import SafetyGate
from tests.factories import OLD_RELEASE, Sessions, fetch_one, stage_vehicles
from tests.services.rollouts.conftest import RELEASE
from workflows.policy import unsettled


async def test_batches_walk_the_stage_by_cursor(sessions: Sessions, rollout_id: int) -> None:
    async with session_scope(sessions) as session:
        expansion = await plan.plan_and_expand(session, rollout_id=rollout_id)
    assert expansion.counts_per_stage == [3, 27]
    cursor, seen = "", 0
    while True:
        async with session_scope(sessions) as session:
            batch = await issue.issue_stage_batch(
                session,
                rollout_id=rollout_id,
                stage_index=1,
                release_version=RELEASE,
                after_vehicle_id=cursor,
                batch_size=10,
            )
        if not batch.selected:
            break
        assert batch.last_vehicle_id and batch.last_vehicle_id > cursor
        cursor, seen = batch.last_vehicle_id, seen + batch.issued
    assert seen == 27
    async with session_scope(sessions) as session:
        counts = await queries.progress(session, rollout_id=rollout_id)
    assert (counts.targeted, counts.notified, counts.pending) == (30, 27, 3)


# --- Safety checks on the last heartbeat (SafetyGate) ------------------------------------

CHECKS = SafetyGate(min_battery_percent=30, require_stationary=True, offline_after_seconds=300)
WINDOW = MaintenanceWindowSpec(start="01:00", end="05:00", timezone="Europe/Berlin", days=["sat"])


async def _planned(sessions: Sessions, rollout_id: int) -> list[str]:
    """Plan the rollout; the ids of its stage-1 vehicles (27 of the 30 targets)."""
    async with session_scope(sessions) as session:
        await plan.plan_and_expand(session, rollout_id=rollout_id)
    return await stage_vehicles(sessions, rollout_id, 1)


async def _sql(sessions: Sessions, sql: str, **params: Any) -> None:
    async with session_scope(sessions) as session:
        await (await session.connection()).execute(text(sql), params)


async def _issue(sessions: Sessions, rollout_id: int, safety: SafetyGate) -> issue.IssuedBatch:
    async with session_scope(sessions) as session:
        return await issue.issue_stage_batch(
            session, rollout_id=rollout_id, stage_index=1, release_version=RELEASE, safety=safety
        )


async def _target(sessions: Sessions, rollout_id: int, vehicle_id: str) -> dict[str, Any]:
    return await fetch_one(
        sessions,
        "SELECT t.state, t.reason_code, t.attempt, t.desired_state_id, t.notified_at, t.rechecked,"
        " v.status, v.reason_codes, v.desired_release_version, v.desired_state_id AS vehicle_ds,"
        " v.rollout_id FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r AND t.vehicle_id = :v",
        r=rollout_id,
        v=vehicle_id,
    )


async def _counts(sessions: Sessions, rollout_id: int) -> tuple[int, ...]:
    async with session_scope(sessions) as session:
        c = await queries.progress(session, rollout_id=rollout_id)
    return (c.targeted, c.notified, c.pending, c.blocked)


async def test_a_vehicle_whose_heartbeat_fails_a_check_is_held_back(
    sessions: Sessions, rollout_id: int
) -> None:
    stage = await _planned(sessions, rollout_id)
    low, moving = stage[0], stage[1]
    await _sql(sessions, "UPDATE vehicles SET battery_percent = 10 WHERE id = :v", v=low)
    await _sql(sessions, "UPDATE vehicles SET stationary = false WHERE id = :v", v=moving)
    batch = await _issue(sessions, rollout_id, CHECKS)
    assert (batch.selected, batch.issued, batch.blocked) == (27, 25, 2)
    stage_state = issue.target_set_desired_state_id(rollout_id, "stage:1")
    held = await _target(sessions, rollout_id, low)
    # Not notified: no attempt used, no apply clock; the stage's desired state kept for later.
    assert (held["state"], held["reason_code"], held["attempt"]) == ("blocked", "BATTERY_LOW", 0)
    assert held["desired_state_id"] == stage_state and held["notified_at"] is None
    # The vehicle keeps the desired state it had; its status says why it waits.
    assert (held["desired_release_version"], held["vehicle_ds"], held["rollout_id"]) == (
        OLD_RELEASE,
        None,
        None,
    )
    assert (held["status"], held["reason_codes"]) == ("blocked", ["BATTERY_LOW"])
    parked = await _target(sessions, rollout_id, moving)
    assert (parked["state"], parked["reason_code"]) == ("blocked", "NOT_STATIONARY")
    assert (parked["status"], parked["reason_codes"]) == ("blocked", ["NOT_STATIONARY"])
    passed = await _target(sessions, rollout_id, stage[2])
    assert (passed["state"], passed["attempt"], passed["status"]) == ("notified", 1, "pending")
    assert (passed["desired_release_version"], passed["vehicle_ds"]) == (RELEASE, stage_state)
    # Both count as reached by the stage (the failure threshold's denominator), 2 blocked.
    assert await _counts(sessions, rollout_id) == (30, 27, 3, 2)


async def test_a_stale_or_absent_heartbeat_is_not_trusted(
    sessions: Sessions, rollout_id: int
) -> None:
    stage = await _planned(sessions, rollout_id)
    stale, never, offline, narrow_fresh, narrow_low = stage[:5]
    await _sql(
        sessions,
        "UPDATE vehicles SET last_seen_at = now() - interval '301 seconds' WHERE id = :v",
        v=stale,
    )
    await _sql(sessions, "UPDATE vehicles SET last_seen_at = NULL WHERE id = :v", v=never)
    await _sql(
        sessions,
        "UPDATE vehicles SET last_seen_at = now() - interval '1 hour', status = 'offline'"
        " WHERE id = :v",
        v=offline,
    )
    # The wide row lags the narrow one (docs/data-model.md): the fresher of the two counts.
    await _sql(
        sessions,
        "UPDATE vehicles SET last_seen_at = now() - interval '1 hour', battery_percent = 5"
        " WHERE id = ANY(:v)",
        v=[narrow_fresh, narrow_low],
    )
    await _sql(
        sessions,
        "INSERT INTO vehicle_telemetry (vehicle_id, last_seen_at, battery_percent, stationary)"
        " VALUES (:a, now(), 90, true), (:b, now(), 12, true)",
        a=narrow_fresh,
        b=narrow_low,
    )
    batch = await _issue(sessions, rollout_id, CHECKS)
    assert (batch.issued, batch.blocked) == (23, 4)
    reasons = {v: (await _target(sessions, rollout_id, v)) for v in stage[:5]}
    assert {v: (r["state"], r["reason_code"]) for v, r in reasons.items()} == {
        stale: ("blocked", "HEARTBEAT_STALE"),
        never: ("blocked", "HEARTBEAT_STALE"),
        offline: ("blocked", "HEARTBEAT_STALE"),
        narrow_fresh: ("notified", None),
        narrow_low: ("blocked", "BATTERY_LOW"),
    }
    # Offline wins over blocked; the reason is recorded all the same.
    assert (reasons[offline]["status"], reasons[offline]["reason_codes"]) == (
        "offline",
        ["HEARTBEAT_STALE"],
    )


async def test_without_checks_every_vehicle_is_notified(
    sessions: Sessions, rollout_id: int
) -> None:
    stage = await _planned(sessions, rollout_id)
    await _sql(
        sessions,
        "UPDATE vehicles SET battery_percent = 3, stationary = false, last_seen_at = NULL"
        " WHERE id = ANY(:v)",
        v=stage[:3],
    )
    batch = await _issue(sessions, rollout_id, SafetyGate())  # the default: no checks
    assert (batch.issued, batch.blocked) == (27, 0)
    assert await _counts(sessions, rollout_id) == (30, 27, 3, 0)


async def test_the_stage_desired_state_carries_the_constraints(
    sessions: Sessions, rollout_id: int
) -> None:
    await _planned(sessions, rollout_id)
    gate = SafetyGate(min_battery_percent=45, require_stationary=True, window=WINDOW)
    await _issue(sessions, rollout_id, gate)
    row = await fetch_one(
        sessions,
        "SELECT constraints FROM desired_states WHERE id = :id",
        id=issue.target_set_desired_state_id(rollout_id, "stage:1"),
    )
    assert row["constraints"] == {
        "minBatteryPercent": 45,
        "requireStationary": True,
        "maintenanceWindow": {
            "start": "01:00",
            "end": "05:00",
            "timezone": "Europe/Berlin",
            "days": ["sat"],
        },
    }


async def _recheck(sessions: Sessions, rollout_id: int, safety: SafetyGate) -> int:
    async with session_scope(sessions) as session:
        batch = await sweeps.recheck_blocked(
            session, rollout_id=rollout_id, now=datetime.now(UTC), safety=safety
        )
    return batch.changed


async def test_a_held_back_vehicle_is_notified_once_a_heartbeat_passes(
    sessions: Sessions, rollout_id: int
) -> None:
    stage = await _planned(sessions, rollout_id)
    low, stale = stage[0], stage[1]
    await _sql(sessions, "UPDATE vehicles SET battery_percent = 10 WHERE id = :v", v=low)
    await _sql(sessions, "UPDATE vehicles SET last_seen_at = NULL WHERE id = :v", v=stale)
    await _issue(sessions, rollout_id, CHECKS)
    assert not (await _target(sessions, rollout_id, stage[2]))["rechecked"]  # issued: waited for
    assert await _recheck(sessions, rollout_id, CHECKS) == 0  # nothing new: nothing moves
    # The low one charges but drives off: still held back, for the other reason now.
    await _sql(
        sessions,
        "UPDATE vehicles SET battery_percent = 60, stationary = false, last_seen_at = now()"
        " WHERE id = :v",
        v=low,
    )
    assert await _recheck(sessions, rollout_id, CHECKS) == 1
    moving = await _target(sessions, rollout_id, low)
    assert (moving["state"], moving["reason_code"], moving["reason_codes"]) == (
        "blocked",
        "NOT_STATIONARY",
        ["NOT_STATIONARY"],
    )
    # Both send a passing heartbeat: notified, with the stage's desired state.
    await _sql(
        sessions,
        "UPDATE vehicles SET battery_percent = 60, stationary = true, last_seen_at = now()"
        " WHERE id = ANY(:v)",
        v=[low, stale],
    )
    assert await _recheck(sessions, rollout_id, CHECKS) == 2
    stage_state = issue.target_set_desired_state_id(rollout_id, "stage:1")
    for vehicle_id in (low, stale):
        sent = await _target(sessions, rollout_id, vehicle_id)
        assert (sent["state"], sent["reason_code"], sent["attempt"]) == ("notified", None, 1)
        assert sent["notified_at"] is not None
        assert (sent["desired_release_version"], sent["vehicle_ds"], sent["rollout_id"]) == (
            RELEASE,
            stage_state,
            rollout_id,
        )
        assert (sent["status"], sent["reason_codes"]) == ("pending", [])
        assert sent["rechecked"]
    # Notified once: the stage had reached them already.
    assert await _counts(sessions, rollout_id) == (30, 27, 3, 0)
    # The settle waits for the 25 issued at once, not for the 2 re-notified after a block.
    async with session_scope(sessions) as session:
        counts = await outcomes.gate_counts(
            session, rollout_id=rollout_id, stage_index=1, max_attempts=3
        )
    assert (counts.notified, counts.rechecked, counts.blocked) == (27, 2, 0)
    assert unsettled(counts) == 25


async def test_a_held_back_vehicle_taken_by_a_later_assignment_is_skipped(
    sessions: Sessions, rollout_id: int
) -> None:
    stage = await _planned(sessions, rollout_id)
    await _sql(sessions, "UPDATE vehicles SET battery_percent = 10 WHERE id = ANY(:v)", v=stage[:1])
    await _issue(sessions, rollout_id, CHECKS)
    # An operator's direct desired state moves the vehicle on; then it passes the checks.
    direct = uuid.uuid4()
    await _sql(
        sessions,
        "UPDATE vehicles SET desired_state_id = :ds, desired_release_version = 'other',"
        " battery_percent = 90, last_seen_at = now() WHERE id = :v",
        ds=direct,
        v=stage[0],
    )
    assert await _recheck(sessions, rollout_id, CHECKS) == 1
    left = await _target(sessions, rollout_id, stage[0])
    assert (left["state"], left["reason_code"]) == ("skipped", "SUPERSEDED")
    assert (left["vehicle_ds"], left["desired_release_version"]) == (direct, "other")
    assert await _counts(sessions, rollout_id) == (30, 27, 3, 0)
