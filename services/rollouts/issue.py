"""Issuing a stage: the desired state goes out to the stage's vehicles, batch by batch.

A rollout's desired states are shared by a target set, their ids derived (md5 as a uuid) from
the workflow id and the set: `stage:<i>` (a stage's first issue), `retry:<k>` (every
vehicle's k-th attempt), `rollback:<release>` (every vehicle returning to that release). An
activity that runs twice therefore writes nothing new.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.defaults import ISSUE_BATCH_SIZE

# The rollback desired state of target `t` (SQL; `:created_by` is the workflow id): a target
# whose desired_state_id is this one is in the rollback phase.
ROLLBACK_DESIRED_STATE = (
    "md5(CAST(:created_by AS text) || ':rollback:'"
    " || coalesce(t.previous_release_version, ''))::uuid"
)


def target_set_desired_state_id(rollout_id: int, target_set: str) -> uuid.UUID:
    """The id of the desired state a rollout writes for a target set (`stage:0`, ...)."""
    key = f"{rollout_workflow_id(rollout_id)}:{target_set}"
    return uuid.UUID(hashlib.md5(key.encode()).hexdigest())


def desired_states_written(*, desired_state_id: str, release: str, reason: str, where: str) -> str:
    """The CTE `desired_states_written` of a statement whose CTE `todo` holds targets: one
    target-set desired state per distinct `desired_state_id` of `todo`'s rows meeting `where`
    (SQL expressions over `todo`), written once (its id derives from the set)."""
    return f"""
    desired_states_written AS (
        INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                    reason, created_by)
        SELECT DISTINCT {desired_state_id}, NULL::text, {release}, :rid, {reason}, :created_by
        FROM todo WHERE {where}
        ON CONFLICT (id) DO NOTHING
    ),"""


@dataclass(frozen=True)
class IssuedBatch:
    selected: int
    issued: int
    last_vehicle_id: str | None


# The batch's bounds first, as values: the planner then sees a range of `batch_size` rows on
# both tables (a CTE's bound would look like a third of the fleet: a sequential scan).
_BATCH_BOUNDS = text(
    """
    SELECT count(*) AS selected, max(vehicle_id) AS last_vehicle_id
    FROM (
        SELECT vehicle_id FROM rollout_targets
        WHERE rollout_id = :rid AND stage = :stage AND vehicle_id > :after
        ORDER BY vehicle_id
        LIMIT :n
    ) batch
    """
)

# Per vehicle of the batch still `planned`, in one statement: the target `notified`, the
# stage's desired state written once, the vehicle's desired release, desired state and
# rollout. Neither update changes an indexed column: heap-only (HOT) updates.
_ISSUE_BATCH = text(
    """
    WITH notified AS (
        UPDATE rollout_targets t
        SET state = 'notified',
            attempt = t.attempt + 1,
            desired_state_id = CAST(:desired_state_id AS uuid),
            notified_at = coalesce(CAST(:issued_at AS timestamptz), now()),
            updated_at = now()
        WHERE t.rollout_id = :rid AND t.stage = :stage AND t.state = 'planned'
          AND t.vehicle_id > :after AND t.vehicle_id <= :last
        RETURNING t.vehicle_id
    ),
    desired_state AS (
        INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                    reason, created_by)
        SELECT CAST(:desired_state_id AS uuid), NULL, :release, :rid, :reason, :created_by
        WHERE EXISTS (SELECT 1 FROM notified)
        ON CONFLICT (id) DO NOTHING
    ),
    vehicles_issued AS (
        UPDATE vehicles v
        SET desired_release_version = :release,
            desired_state_id = CAST(:desired_state_id AS uuid),
            rollout_id = :rid,
            status = CASE WHEN v.status = 'offline' THEN v.status
                          ELSE 'pending' END,
            updated_at = now()
        FROM notified
        WHERE v.id = notified.vehicle_id AND v.id > :after AND v.id <= :last
    )
    SELECT count(*) FROM notified
    """
)


async def issue_stage_batch(
    session: AsyncSession,
    *,
    rollout_id: int,
    stage_index: int,
    release_version: str,
    after_vehicle_id: str = "",
    batch_size: int = ISSUE_BATCH_SIZE,
    issued_at: datetime | None = None,
) -> IssuedBatch:
    """Issue the desired state to the next `batch_size` targets of one stage.

    Keyset over vehicle id after `after_vehicle_id`; only targets still `planned` inside the
    batch are issued, so a batch re-run after it committed changes nothing. One desired state
    for the whole stage, its previous desired state and release kept on each target when it
    was planned. A target is `notified` at `issued_at` (the workflow's time; default now():
    the start of its apply timeout). Then the rollout's counters move by the number issued.
    """
    conn = await session.connection()
    bound = (
        await conn.execute(
            _BATCH_BOUNDS,
            {"rid": rollout_id, "stage": stage_index, "after": after_vehicle_id, "n": batch_size},
        )
    ).one()
    if not bound.selected:
        return IssuedBatch(selected=0, issued=0, last_vehicle_id=None)
    desired_state_id = target_set_desired_state_id(rollout_id, f"stage:{stage_index}")
    issued = (
        await conn.execute(
            _ISSUE_BATCH,
            {
                "rid": rollout_id,
                "stage": stage_index,
                "after": after_vehicle_id,
                "last": bound.last_vehicle_id,
                "release": release_version,
                "desired_state_id": str(desired_state_id),
                "created_by": rollout_workflow_id(rollout_id),
                "reason": f"rollout {rollout_id}, stage {stage_index}",
                "issued_at": issued_at,
            },
        )
    ).scalar_one()
    if issued:
        await conn.execute(
            text(
                "UPDATE rollouts SET notified = notified + :n, pending = greatest(pending - :n, 0),"
                " updated_at = now() WHERE id = :rid"
            ),
            {"rid": rollout_id, "n": issued},
        )
    return IssuedBatch(
        selected=int(bound.selected), issued=int(issued), last_vehicle_id=bound.last_vehicle_id
    )
