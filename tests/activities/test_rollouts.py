"""The rollout activities against real PostgreSQL (ActivityEnvironment, no Temporal server)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.rollouts import RolloutActivities
from core.db import session_scope
from models.enums import AuditSource
from models.scope import Scope
from models.workflows import (
    ExpandTargetsInput,
    IssueStageInput,
    RollbackTargetsInput,
    UpdateRolloutStatusInput,
)
from services.audit import Actor
from services.rollouts import control
from tests.factories import (
    OLD_RELEASE,
    Sessions,
    fetch_all,
    fetch_one,
    make_fleet,
    make_release,
    make_rollout,
    stage_vehicles,
    strategy,
    unique_prefix,
)

NEW_RELEASE = "2026.2.0-act"


@pytest.fixture
async def fleet(sessions: Sessions) -> str:
    prefix = unique_prefix("act")
    await make_fleet(sessions, prefix=prefix, count=300)
    await make_release(sessions, version=NEW_RELEASE)
    return prefix


@pytest.fixture
def acts(sessions: Sessions) -> RolloutActivities:
    return RolloutActivities(sessions)


async def _rollout(sessions: Sessions, prefix: str, **kw: Any) -> int:
    # model m1 and regions eu-west/us-east: i even and i % 3 != 2, i.e. i % 6 in (0, 4): 100.
    targets = {"models": [prefix + "m1"], "regions": [prefix + "eu-west", prefix + "us-east"]}
    return await make_rollout(
        sessions,
        release_version=NEW_RELEASE,
        targets=kw.pop("targets", targets),
        strategy=kw.pop("strategy", strategy()),
    )


async def test_expand_targets_plans_deterministically_and_once(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    rollout_id = await _rollout(sessions, fleet)
    env = ActivityEnvironment()
    first = await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    assert first.inserted and first.targeted == 100
    assert [(s.name, s.size) for s in first.stages] == [
        ("canary", 5),
        ("wave-1", 45),
        ("wave-2", 50),
    ]
    rows = await fetch_all(
        sessions,
        "SELECT vehicle_id, stage, rank, state FROM rollout_targets WHERE rollout_id = :r"
        " ORDER BY rank",
        r=rollout_id,
    )
    assert len(rows) == 100
    assert all(int(r["vehicle_id"][len(fleet) :]) % 6 in (0, 4) for r in rows)
    assert {r["state"] for r in rows} == {"planned"}
    # rank: the order of md5("{rollout}:{vehicle}"), ties by id; stages follow the ranks.
    expected = sorted(
        (r["vehicle_id"] for r in rows),
        key=lambda v: (hashlib.md5(f"{rollout_id}:{v}".encode()).hexdigest(), v),
    )
    assert [r["vehicle_id"] for r in rows] == expected
    assert [r["rank"] for r in rows] == list(range(100))
    assert [r["stage"] for r in rows] == [0] * 5 + [1] * 45 + [2] * 50
    counters = await fetch_one(
        sessions,
        "SELECT targeted, pending, notified, stage_count FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert counters == {"targeted": 100, "pending": 100, "notified": 0, "stage_count": 3}

    # A retried activity (or a new vehicle arriving meanwhile) changes nothing.
    await make_fleet(sessions, prefix=fleet + "late-", count=6)
    again = await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    assert not again.inserted
    assert again.stages == first.stages and again.targeted == 100
    rows_again = await fetch_all(
        sessions,
        "SELECT vehicle_id, stage, rank, state FROM rollout_targets WHERE rollout_id = :r"
        " ORDER BY rank",
        r=rollout_id,
    )
    assert rows_again == rows


async def test_expand_targets_by_vehicle_ids_and_rings(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    ids = [f"{fleet}{i:07d}" for i in (1, 2, 3, 4, 5, 6)] + ["no-such-vehicle"]
    rollout_id = await _rollout(
        sessions,
        fleet,
        targets={"vehicleIds": ids, "rings": ["beta", "ga"], "models": []},
        strategy=strategy(canary_size=None, waves=[{"percent": 100, "bakeSeconds": 0}]),
    )
    result = await ActivityEnvironment().run(
        acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id)
    )
    # rings beta/ga: i % 3 in (1, 2) -> 1, 2, 4, 5
    assert result.targeted == 4
    assert [(s.name, s.size) for s in result.stages] == [("wave-1", 4)]


def _stage(rollout_id: int, index: int, name: str, *, batch_size: int) -> IssueStageInput:
    """Issue one stage of the rollout, `batch_size` vehicles a batch."""
    return IssueStageInput(
        rollout_id=rollout_id,
        release_version=NEW_RELEASE,
        stage_index=index,
        stage=name,
        batch_size=batch_size,
    )


async def _issued_targets(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    """Every target issued so far, by vehicle id: its row, its vehicle and its desired state."""
    return await fetch_all(
        sessions,
        """
        SELECT t.vehicle_id, t.state, t.attempt, t.previous_release_version,
               t.desired_state_id = v.desired_state_id AS same_ds,
               v.desired_release_version, v.status, v.rollout_id,
               d.release_version AS ds_release, d.created_by, d.rollout_id AS ds_rollout
        FROM rollout_targets t
        JOIN vehicles v ON v.id = t.vehicle_id
        JOIN desired_states d ON d.id = t.desired_state_id
        WHERE t.rollout_id = :r AND t.state <> 'planned'
        ORDER BY t.vehicle_id
        """,
        r=rollout_id,
    )


async def _stage_states(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    """Targets per (stage, state)."""
    return await fetch_all(
        sessions,
        "SELECT stage, state, count(*) AS n FROM rollout_targets WHERE rollout_id = :r"
        " GROUP BY stage, state ORDER BY stage",
        r=rollout_id,
    )


async def test_issue_stage_issues_exactly_the_stage_and_is_idempotent(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    rollout_id = await _rollout(sessions, fleet)
    env = ActivityEnvironment()
    heartbeats: list[Any] = []
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    # One canary vehicle already had a desired state of its own: it is kept as "previous".
    canary_ids = await stage_vehicles(sessions, rollout_id, 0)
    assert len(canary_ids) == 5

    canary = _stage(rollout_id, 0, "canary", batch_size=2)
    result = await env.run(acts.issue_stage, canary)
    assert (result.issued, result.batches) == (5, 3)
    assert result.counts.notified == 5 and result.counts.pending == 95
    assert [h.issued for h in heartbeats] == [2, 4, 5]
    assert heartbeats[-1].last_vehicle_id == canary_ids[-1]

    notified = await _issued_targets(sessions, rollout_id)
    assert [n["vehicle_id"] for n in notified] == canary_ids
    for n in notified:
        assert n == {
            "vehicle_id": n["vehicle_id"],
            "state": "notified",
            "attempt": 1,
            "previous_release_version": OLD_RELEASE,
            "same_ds": True,
            "desired_release_version": NEW_RELEASE,
            "status": "pending",
            "rollout_id": rollout_id,
            "ds_release": NEW_RELEASE,
            "created_by": f"rollout-{rollout_id}",
            "ds_rollout": rollout_id,
        }

    # Re-running the stage (a retry after it committed) is a no-op.
    again = await env.run(acts.issue_stage, canary)
    assert again.issued == 0 and again.counts.notified == 5
    # One desired state for the stage's target set, every notified vehicle pointing to it.
    ds = await fetch_all(
        sessions,
        "SELECT id::text AS id, vehicle_id FROM desired_states WHERE rollout_id = :r",
        r=rollout_id,
    )
    assert len(ds) == 1 and ds[0]["vehicle_id"] is None
    shared = await fetch_one(
        sessions,
        "SELECT count(DISTINCT desired_state_id::text) AS n, min(desired_state_id::text) AS id"
        " FROM vehicles WHERE rollout_id = :r",
        r=rollout_id,
    )
    assert shared == {"n": 1, "id": ds[0]["id"]}

    # A retry resuming from a heartbeat cursor finishes the stage without duplicates.
    wave = await env.run(acts.issue_stage, _stage(rollout_id, 1, "wave-1", batch_size=7))
    assert (wave.issued, wave.batches) == (45, 7)
    assert wave.counts.notified == 50 and wave.counts.pending == 50
    assert await _stage_states(sessions, rollout_id) == [
        {"stage": 0, "state": "notified", "n": 5},
        {"stage": 1, "state": "notified", "n": 45},
        {"stage": 2, "state": "planned", "n": 50},
    ]


async def test_issue_stage_resumes_from_heartbeat(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    rollout_id = await _rollout(sessions, fleet)
    env = ActivityEnvironment()
    await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    env.info = env.info.__class__(
        **{**env.info.__dict__, "heartbeat_details": [{"last_vehicle_id": "~", "issued": 0}]}
    )
    # A cursor past every id: the attempt resumes there and issues nothing before it.
    resumed = await env.run(
        acts.issue_stage,
        IssueStageInput(
            rollout_id=rollout_id, release_version=NEW_RELEASE, stage_index=0, stage="canary"
        ),
    )
    assert resumed.issued == 0


async def _status_row(sessions: Sessions, rollout_id: int) -> dict[str, Any]:
    return await fetch_one(
        sessions,
        "SELECT status, status_reason, stage, stage_index, waiting_for,"
        " started_at IS NOT NULL AS started, finished_at IS NULL AS open FROM rollouts"
        " WHERE id = :r",
        r=rollout_id,
    )


async def _audit_entries(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    """The rollout's audit entries, in order, with the status each recorded."""
    return await fetch_all(
        sessions,
        "SELECT actor, source, action, target_type, target_id, reason, correlation_id, result,"
        " payload ->> 'status' AS status FROM audit_log WHERE target_type = 'rollout'"
        " AND target_id = :t ORDER BY id",
        t=str(rollout_id),
    )


async def _feed_events(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    """The rollout's change-feed events on the `rollouts` topic, in order."""
    return await fetch_all(
        sessions,
        "SELECT topic, event, payload FROM change_feed WHERE entity_id = :t AND topic = 'rollouts'"
        " ORDER BY id",
        t=str(rollout_id),
    )


async def test_update_status_audits_each_change_once(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    rollout_id = await _rollout(sessions, fleet)
    env = ActivityEnvironment()
    running = UpdateRolloutStatusInput(
        rollout_id=rollout_id,
        status="running",
        stage="canary",
        stage_index=0,
        waiting_for="issuing canary",
        action="rollout.stage_started",
        correlation_id="c-1",
    )
    assert (await env.run(acts.update_rollout_status, running)).changed
    assert not (await env.run(acts.update_rollout_status, running)).changed
    # Only what it waits for changes: a change-feed event, no audit entry.
    baking = running.model_copy(update={"waiting_for": "bake", "action": "rollout.baking"})
    assert (await env.run(acts.update_rollout_status, baking)).changed
    paused = baking.model_copy(
        update={
            "status": "paused",
            "status_reason": "OPERATOR",
            "action": "rollout.paused",
            "actor": "alice",
            "source": "temporal",
            "reason": "investigating",
        }
    )
    assert (await env.run(acts.update_rollout_status, paused)).changed

    assert await _status_row(sessions, rollout_id) == {
        "status": "paused",
        "status_reason": "OPERATOR",
        "stage": "canary",
        "stage_index": 0,
        "waiting_for": "bake",
        "started": True,
        "open": True,
    }
    assert await _audit_entries(sessions, rollout_id) == [
        {
            "actor": "workflow",
            "source": "system",
            "action": "rollout.stage_started",
            "target_type": "rollout",
            "target_id": str(rollout_id),
            "reason": None,
            "correlation_id": "c-1",
            "result": "ok",
            "status": "running",
        },
        {
            "actor": "alice",
            "source": "temporal",
            "action": "rollout.paused",
            "target_type": "rollout",
            "target_id": str(rollout_id),
            "reason": "investigating",
            "correlation_id": "c-1",
            "result": "ok",
            "status": "paused",
        },
    ]
    feed = await _feed_events(sessions, rollout_id)
    assert [(f["topic"], f["event"]) for f in feed] == [("rollouts", "rollout.updated")] * 3
    assert feed[-1]["payload"]["status"] == "paused"
    assert feed[-1]["payload"]["stage"] == "canary"
    assert set(feed[-1]["payload"]["counts"]) >= {"targeted", "notified", "pending"}


async def test_rollback_returns_vehicles_to_their_previous_release(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    rollout_id = await _rollout(sessions, fleet)
    env = ActivityEnvironment()
    await env.run(acts.expand_targets, ExpandTargetsInput(rollout_id=rollout_id))
    await env.run(
        acts.issue_stage,
        IssueStageInput(
            rollout_id=rollout_id, release_version=NEW_RELEASE, stage_index=0, stage="canary"
        ),
    )
    # Batches of 2: a keyset pass over the targets (2 + 2 + 1).
    result = await env.run(
        acts.rollback_targets, RollbackTargetsInput(rollout_id=rollout_id, batch_size=2)
    )
    assert (result.reverted, result.skipped) == (5, 95)
    again = await env.run(acts.rollback_targets, RollbackTargetsInput(rollout_id=rollout_id))
    assert (again.reverted, again.skipped) == (0, 0)
    vehicles = await fetch_all(
        sessions,
        "SELECT v.desired_release_version, v.status, t.state, d.release_version AS ds_release,"
        " d.vehicle_id IS NULL AS target_set, d.reason"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " LEFT JOIN desired_states d ON d.id = v.desired_state_id"
        " WHERE t.rollout_id = :r AND t.stage = 0",
        r=rollout_id,
    )
    assert (
        vehicles
        == [
            {
                "desired_release_version": OLD_RELEASE,
                "status": "in_sync",
                "state": "rolled_back",
                "ds_release": OLD_RELEASE,
                # one desired state for every vehicle returning to OLD_RELEASE
                "target_set": True,
                "reason": f"rollback of rollout {rollout_id}",
            }
        ]
        * 5
    )


async def test_unknown_rollout_is_a_non_retryable_failure(acts: RolloutActivities) -> None:
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(
            acts.expand_targets, ExpandTargetsInput(rollout_id=987654321)
        )
    assert err.value.non_retryable and err.value.type == "RolloutNotFound"


async def test_update_status_skips_only_the_entry_the_api_wrote(
    sessions: Sessions, fleet: str, acts: RolloutActivities
) -> None:
    """An operator's action carries the API's marker when it came through the API: the entry
    is skipped only when the marker proves the API's own entry for this very action."""
    rollout_id = await _rollout(sessions, fleet)
    async with session_scope(sessions) as session:
        requested = await control.request_control(
            session,
            scope=Scope(),
            rollout_id=rollout_id,
            action="pause",
            reason="investigating",
            actor=Actor("alice", "operator", AuditSource.API),
        )
    env = ActivityEnvironment()
    paused = UpdateRolloutStatusInput(
        rollout_id=rollout_id,
        status="paused",
        status_reason="OPERATOR",
        action="rollout.paused",
        actor="alice",
        source="temporal",
        control_action="pause",
        api_marker=requested.marker,
        accepted_at=datetime.now(UTC),
    )
    assert (await env.run(acts.update_rollout_status, paused)).changed
    # The same marker for another action proves nothing: audited as source temporal.
    resumed = paused.model_copy(
        update={
            "status": "running",
            "status_reason": None,
            "action": "rollout.resumed",
            "control_action": "resume",
        }
    )
    assert (await env.run(acts.update_rollout_status, resumed)).changed
    entries = await _audit_entries(sessions, rollout_id)
    assert [(e["action"], e["source"], e["actor"]) for e in entries] == [
        ("rollout.pause_requested", "api", "alice"),
        ("rollout.resumed", "temporal", "alice"),
    ]
