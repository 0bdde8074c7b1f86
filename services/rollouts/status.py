"""A rollout's status: once the rollout is created (`create.py` inserts it `pending`), the
only writer of `rollouts.status` (with its stage, reason and what it waits for). Every change
publishes a `rollout.updated` stream event; a change of status or stage also adds its audit
entry.

The workflow sets every status through the `update_rollout_status` activity. Two writers act
on a `pending` rollout whose workflow does not exist: the API's abort (`abort_unstarted`), and
the reconcile, which marks `failed` (`WORKFLOW_START_FAILED`, `mark_start_refused`) a pending
rollout whose workflow Temporal will never run (it is closed already). Progress without a
status change (a batch issued, a sweep) is announced by `publish_rollout`.

No transition leaves a terminal status (`TERMINAL_ROLLOUT_STATUSES`): `set_rollout_status`
refuses it (returns False, logs a warning, writes nothing) and the workflow, told so by its
activity (`UpdateRolloutStatusResult.status`), ends at once without issuing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus, StatusReason
from models.workflows import RolloutCounts
from services import audit, change_feed
from services.audit import Actor, audit_scope
from services.rollouts.counters import COUNTS_COLUMNS
from services.rollouts.queries import as_dict, rollout_columns

log = structlog.get_logger(__name__)

# Who writes a status the workflow decided on its own (a gate, a stage's end).
WORKFLOW = Actor(subject="workflow", role=None, source=AuditSource.SYSTEM)
# A new rollout's `waitingFor` until its workflow writes its first status (`running`).
WAITING_FOR_START = "its workflow to start"

_WRITE = text(
    """
    UPDATE rollouts
    SET status = :status, status_reason = :status_reason, stage = :stage,
        stage_index = :stage_index, waiting_for = :waiting_for, updated_at = now(),
        started_at = CASE WHEN :status = 'running' THEN coalesce(started_at, now())
                          ELSE started_at END,
        finished_at = CASE WHEN :terminal THEN coalesce(finished_at, now())
                           ELSE finished_at END
    WHERE id = :rid
    """
)


async def rollout_snapshot(session: AsyncSession, *, rollout_id: int) -> dict[str, Any]:
    """The rollout's change-feed payload (`snapshot_of`), read from its row."""
    row = await rollout_columns(
        session,
        rollout_id=rollout_id,
        columns="id, status, status_reason, stage, stage_index, stage_count, waiting_for, "
        + COUNTS_COLUMNS,
    )
    return snapshot_of(row._asdict())


def snapshot_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The change-feed payload of a rollout (its columns by name): `{id, status,
    statusReason, stage, stageIndex, stageCount, waitingFor, progress}`, the fields of GET
    /rollouts/{id} that move, named and shaped as it renders them; plus `counts`, the same as
    `progress` (its name before 1.6.0, kept for clients that read it)."""
    return {
        "id": data["id"],
        "status": data["status"],
        "statusReason": data["status_reason"],
        "stage": data["stage"],
        "stageIndex": data["stage_index"],
        "stageCount": data["stage_count"],
        "waitingFor": data["waiting_for"],
        "progress": (progress := RolloutCounts.model_validate(data).model_dump()),
        "counts": progress,
    }


async def publish_rollout(
    session: AsyncSession, *, rollout_id: int, snapshot: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A `rollout.updated` event with the rollout as it is now (its snapshot), in the
    caller's transaction."""
    snapshot = snapshot or await rollout_snapshot(session, rollout_id=rollout_id)
    await change_feed.publish(
        session,
        topic="rollouts",
        event="rollout.updated",
        entity_id=str(rollout_id),
        payload=snapshot,
    )
    return snapshot


async def set_rollout_status(
    session: AsyncSession,
    *,
    rollout_id: int,
    status: str,
    action: str,
    stage: str | None = None,
    stage_index: int | None = None,
    status_reason: str | None = None,
    waiting_for: str | None = None,
    actor: Actor = WORKFLOW,
    reason: str | None = None,
    result: str = "ok",
    audit_entry: bool = True,
) -> bool:
    """Write the rollout's status (and stage, reason, what it waits for); when anything
    changed, publish its `rollout.updated` event and, for a transition of status or stage,
    the audit entry `action` (unless `audit_entry` is False: the API audited the operator's
    request itself). Returns whether it changed (False for a re-run of the same change:
    idempotent; False too, with a warning and nothing written, for a transition out of a
    terminal status: a finished rollout never runs again).

    `stage`/`stage_index` None keep the current ones. `started_at` is set on the first
    `running`, `finished_at` on a terminal status.
    """
    terminal = RolloutStatus(status) in TERMINAL_ROLLOUT_STATUSES  # refuses an unknown status
    current = await rollout_columns(
        session,
        rollout_id=rollout_id,
        columns="status, status_reason, stage, stage_index, waiting_for, targets",
        for_update=True,
    )
    if current.status != status and RolloutStatus(current.status) in TERMINAL_ROLLOUT_STATUSES:
        log.warning(
            "rollout.status_refused",
            rollout_id=rollout_id,
            current=current.status,
            wanted=status,
            action=action,
            why="no transition out of a terminal status",
        )
        return False
    new_stage = current.stage if stage is None else stage
    new_index = current.stage_index if stage_index is None else stage_index
    wanted = (status, status_reason, new_stage, new_index, waiting_for)
    if wanted == (
        current.status,
        current.status_reason,
        current.stage,
        current.stage_index,
        current.waiting_for,
    ):
        return False
    await (await session.connection()).execute(
        _WRITE,
        {
            "rid": rollout_id,
            "status": status,
            "status_reason": status_reason,
            "stage": new_stage,
            "stage_index": new_index,
            "waiting_for": waiting_for,
            "terminal": terminal,
        },
    )
    snapshot = await rollout_snapshot(session, rollout_id=rollout_id)
    # An audit entry for a real transition; a change of what it waits for is only an event.
    if audit_entry and (current.status, current.stage) != (status, new_stage):
        await audit.record(
            session,
            actor=actor,
            action=action,
            target_type="rollout",
            target_id=str(rollout_id),
            reason=reason,
            payload=snapshot,
            result=result,
            **audit_scope(as_dict(current.targets)),
        )
    await publish_rollout(session, rollout_id=rollout_id, snapshot=snapshot)
    return True


async def mark_start_refused(session: AsyncSession, *, rollout_id: int, why: str) -> bool:
    """A `pending` rollout whose workflow Temporal will never run (its id is taken by a closed
    workflow: id reuse policy REJECT_DUPLICATE): `failed` (`WORKFLOW_START_FAILED`), audited as
    `rollout.start_failed` by the reconcile. Only from `pending` (the row is locked and checked
    again): returns whether it wrote."""
    return await _leave_pending(
        session,
        rollout_id=rollout_id,
        status=RolloutStatus.FAILED,
        action="rollout.start_failed",
        status_reason=StatusReason.WORKFLOW_START_FAILED,
        actor=Actor("reconcile", None, AuditSource.SYSTEM),
        reason=why[:500],
        result="error",
    )


async def abort_unstarted(
    session: AsyncSession, *, rollout_id: int, actor: Actor, reason: str
) -> bool:
    """Abort a `pending` rollout whose workflow does not exist (its start is still to come):
    `aborted` (`OPERATOR`), audited `rollout.aborted` by the operator, as the workflow would
    write it. The row is locked and must still be `pending`: a workflow that started
    meanwhile has written `running` first (then this returns False and the caller asks the
    workflow instead), or it will find the row `aborted` and end at once. Returns whether it
    aborted."""
    return await _leave_pending(
        session,
        rollout_id=rollout_id,
        status=RolloutStatus.ABORTED,
        action="rollout.aborted",
        status_reason=StatusReason.OPERATOR,
        actor=actor,
        reason=reason,
    )


async def _leave_pending(
    session: AsyncSession,
    *,
    rollout_id: int,
    status: RolloutStatus,
    action: str,
    status_reason: StatusReason,
    actor: Actor,
    reason: str,
    result: str = "ok",
) -> bool:
    """`set_rollout_status` on a rollout still `pending` (its row locked and checked first);
    False, nothing written, when it has left `pending` meanwhile."""
    current = await rollout_columns(
        session, rollout_id=rollout_id, columns="status", for_update=True
    )
    if current.status != RolloutStatus.PENDING:
        return False
    return await set_rollout_status(
        session,
        rollout_id=rollout_id,
        status=status,
        action=action,
        status_reason=status_reason,
        waiting_for=None,
        actor=actor,
        reason=reason,
        result=result,
    )
