"""services.rollout_targets directly (the API's dryRun uses plan_rollout)."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import session_scope
from services import rollout_targets as svc
from tests.activities.fleet import (
    fetch_one,
    make_fleet,
    make_release,
    make_rollout,
    strategy,
    unique_prefix,
)

RELEASE = "2026.2.0-svc"
Sessions = async_sessionmaker[AsyncSession]


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


async def test_plan_rollout_is_read_only(sessions: Sessions, rollout_id: int) -> None:
    async with session_scope(sessions) as session:
        stages = await svc.plan_rollout(session, rollout_id=rollout_id)
    assert [(s.name, s.size) for s in stages] == [("wave-1", 3), ("wave-2", 27)]
    row = await fetch_one(
        sessions,
        "SELECT targeted, stage_count, (SELECT count(*) FROM rollout_targets"
        " WHERE rollout_id = :r) AS targets FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert row == {"targeted": 0, "stage_count": 0, "targets": 0}


async def test_batches_walk_the_stage_by_cursor(sessions: Sessions, rollout_id: int) -> None:
    async with session_scope(sessions) as session:
        expansion = await svc.plan_and_expand(session, rollout_id=rollout_id)
    assert expansion.counts_per_stage == [3, 27]
    cursor, seen = "", 0
    while True:
        async with session_scope(sessions) as session:
            batch = await svc.issue_stage_batch(
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
        counts = await svc.progress(session, rollout_id=rollout_id)
    assert (counts.targeted, counts.notified, counts.pending) == (30, 27, 3)


async def test_unknown_status_and_rollout_are_refused(sessions: Sessions, rollout_id: int) -> None:
    async with session_scope(sessions) as session:
        with pytest.raises(ValueError):
            await svc.set_rollout_status(
                session, rollout_id=rollout_id, status="exploded", action="x"
            )
        with pytest.raises(svc.RolloutNotFound):
            await svc.progress(session, rollout_id=10**12)
