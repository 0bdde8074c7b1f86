"""Issuing a stage batch by batch, by its cursor (services/rollouts/issue.py)."""

from __future__ import annotations

from core.db import session_scope
from services.rollouts import issue, plan, queries
from tests.factories import Sessions
from tests.services.rollouts.conftest import RELEASE


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
