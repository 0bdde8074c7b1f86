"""The one writer of a rollout's status (services/rollouts/status.py)."""

from __future__ import annotations

import pytest

from core.db import session_scope
from core.errors import RolloutNotFound
from models.enums import AuditSource
from services.audit import Actor
from services.rollouts import queries, status
from tests.factories import Sessions, fetch_all, fetch_one


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
