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


async def test_a_refused_start_is_written_by_the_status_writer(
    sessions: Sessions, rollout_id: int
) -> None:
    """The reconcile's one status write (a pending rollout whose workflow id is held by a
    closed workflow) goes through `set_rollout_status`: the row, the audit entry (scoped like
    the rollout) and the stream event, in one transaction; only from `pending`."""
    async with session_scope(sessions) as session:
        assert await status.mark_start_refused(session, rollout_id=rollout_id, why="closed")
    async with session_scope(sessions) as session:  # not pending any more: nothing
        assert not await status.mark_start_refused(session, rollout_id=rollout_id, why="again")
    row = await fetch_one(
        sessions,
        "SELECT status, status_reason, finished_at IS NOT NULL AS finished FROM rollouts"
        " WHERE id = :r",
        r=rollout_id,
    )
    assert row == {"status": "failed", "status_reason": "WORKFLOW_START_FAILED", "finished": True}
    entry = await fetch_one(
        sessions,
        "SELECT actor, source, result, regions, payload->>'status' AS s"
        " FROM audit_log WHERE target_id = :r AND action = 'rollout.start_failed'",
        r=str(rollout_id),
    )
    assert (entry["actor"], entry["source"], entry["result"], entry["s"]) == (
        "reconcile",
        "system",
        "error",
        "failed",
    )
    assert entry["regions"] and entry["regions"][0].endswith("eu-west")
    events = await fetch_all(
        sessions,
        "SELECT payload->>'status' AS s, payload->>'statusReason' AS why FROM change_feed"
        " WHERE topic = 'rollouts' AND entity_id = :r",
        r=str(rollout_id),
    )
    assert events == [{"s": "failed", "why": "WORKFLOW_START_FAILED"}]


@pytest.mark.parametrize("terminal", ["completed", "rolled_back", "aborted", "failed"])
async def test_no_transition_out_of_a_terminal_status(
    sessions: Sessions, rollout_id: int, terminal: str
) -> None:
    """A finished rollout never runs again: `running` (or any other status) after a terminal
    one is refused, nothing written, no audit entry, no event."""
    async with session_scope(sessions) as session:
        assert await status.set_rollout_status(
            session, rollout_id=rollout_id, status=terminal, action="rollout.x"
        )
    async with session_scope(sessions) as session:
        for wanted in ("running", "pending", "paused", "completed", "aborted"):
            if wanted != terminal:
                assert not await status.set_rollout_status(
                    session, rollout_id=rollout_id, status=wanted, action="rollout.y"
                )
    row = await fetch_one(
        sessions, "SELECT status, started_at FROM rollouts WHERE id = :r", r=rollout_id
    )
    assert row == {"status": terminal, "started_at": None}
    assert not await fetch_all(
        sessions,
        "SELECT id FROM audit_log WHERE target_id = :r AND action = 'rollout.y'",
        r=str(rollout_id),
    )


async def test_abort_of_an_unstarted_rollout_only_from_pending(
    sessions: Sessions, rollout_id: int
) -> None:
    """`abort_unstarted`: a pending rollout is aborted (audited as the operator); once its
    workflow wrote `running`, it is left to the workflow."""
    actor = Actor("alice", "operator", AuditSource.API, correlation_id="req-abort-pending")
    async with session_scope(sessions) as session:
        assert await status.abort_unstarted(
            session, rollout_id=rollout_id, actor=actor, reason="wrong release"
        )
    entry = await fetch_one(
        sessions,
        "SELECT actor, source, reason, payload->>'status' AS s FROM audit_log"
        " WHERE target_id = :r AND action = 'rollout.aborted'",
        r=str(rollout_id),
    )
    assert entry == {"actor": "alice", "source": "api", "reason": "wrong release", "s": "aborted"}
    async with session_scope(sessions) as session:  # aborted: never again
        assert not await status.abort_unstarted(
            session, rollout_id=rollout_id, actor=actor, reason="again"
        )


async def test_abort_of_an_unstarted_rollout_leaves_a_running_one_alone(
    sessions: Sessions, rollout_id: int
) -> None:
    actor = Actor("alice", "operator", AuditSource.API)
    async with session_scope(sessions) as session:
        await status.set_rollout_status(
            session, rollout_id=rollout_id, status="running", action="rollout.started"
        )
    async with session_scope(sessions) as session:
        assert not await status.abort_unstarted(
            session, rollout_id=rollout_id, actor=actor, reason="too late"
        )
    row = await fetch_one(sessions, "SELECT status FROM rollouts WHERE id = :r", r=rollout_id)
    assert row == {"status": "running"}
