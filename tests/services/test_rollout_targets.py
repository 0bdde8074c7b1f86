"""The rollout engine's services directly: planning, issuing by cursor, status refusals."""

from __future__ import annotations

import pytest

from core.db import session_scope
from core.errors import RolloutNotFound
from models.enums import AuditSource
from services.audit import Actor
from services.rollouts import issue, plan, queries, status
from tests.factories import (
    Sessions,
    fetch_all,
    fetch_one,
    make_fleet,
    make_release,
    make_rollout,
    strategy,
    unique_prefix,
)

RELEASE = "2026.2.0-svc"


@pytest.fixture
async def rollout_id(sessions: Sessions) -> int:
    prefix = unique_prefix("svc")
    await make_fleet(sessions, prefix=prefix, count=90)
    await make_release(sessions, version=RELEASE)
    return await make_rollout(
        sessions,
        release_version=RELEASE,
        targets={"regions": [prefix + "eu-west"], "models": [], "rings": None},
        strategy=strategy(canary_size=None, waves=[{"percent": 10}, {"percent": 100}]),
    )


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


async def test_unknown_status_and_rollout_are_refused(sessions: Sessions, rollout_id: int) -> None:
    async with session_scope(sessions) as session:
        with pytest.raises(ValueError):
            await status.set_rollout_status(
                session, rollout_id=rollout_id, status="exploded", action="x"
            )
        with pytest.raises(RolloutNotFound):
            await queries.progress(session, rollout_id=10**12)


async def test_a_failed_start_is_written_by_the_status_writer(
    sessions: Sessions, rollout_id: int
) -> None:
    """The API's one status write goes through `set_rollout_status`: the row, the audit entry
    (scoped like the rollout) and the stream event, in one transaction."""
    actor = Actor("alice", "operator", AuditSource.API, correlation_id="req-start-failed")
    async with session_scope(sessions) as session:
        await status.mark_start_failed(session, rollout_id=rollout_id, actor=actor)
    row = await fetch_one(
        sessions,
        "SELECT status, status_reason, finished_at IS NOT NULL AS finished FROM rollouts"
        " WHERE id = :r",
        r=rollout_id,
    )
    assert row == {"status": "failed", "status_reason": "WORKFLOW_START_FAILED", "finished": True}
    entry = await fetch_one(
        sessions,
        "SELECT actor, role, source, result, correlation_id, regions, payload->>'status' AS s"
        " FROM audit_log WHERE target_id = :r AND action = 'rollout.start_failed'",
        r=str(rollout_id),
    )
    assert entry["actor"] == "alice" and entry["role"] == "operator"
    assert (entry["source"], entry["result"], entry["s"]) == ("system", "error", "failed")
    assert entry["correlation_id"] == "req-start-failed"
    assert entry["regions"] and entry["regions"][0].endswith("eu-west")
    events = await fetch_all(
        sessions,
        "SELECT payload->>'status' AS s, payload->>'statusReason' AS why FROM change_feed"
        " WHERE topic = 'rollouts' AND entity_id = :r",
        r=str(rollout_id),
    )
    assert events == [{"s": "failed", "why": "WORKFLOW_START_FAILED"}]
