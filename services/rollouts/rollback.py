"""Rolling a rollout back: its issued targets return, stage by stage, to the desired release
they had before (kept on each target when it was planned); the never-issued ones are
skipped. The workflow sequences the stages and gates each (workflows/rollout.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.defaults import SWEEP_BATCH_SIZE
from services.rollouts.counters import SweepBatch, move_targets, run_sweep_batch
from services.rollouts.issue import (
    NO_CHECKS,
    ROLLBACK_DESIRED_STATE,
    constraints_param,
    desired_states_written,
)
from services.safety import SafetyGate


async def skip_planned_targets(session: AsyncSession, *, rollout_id: int) -> int:
    """Mark the targets never issued as `skipped` (abort, rollback); returns how many."""
    conn = await session.connection()
    skipped = (
        await conn.execute(
            text(
                """
                WITH skipped AS (
                    UPDATE rollout_targets SET state = 'skipped', updated_at = now()
                    WHERE rollout_id = :rid AND state = 'planned'
                    RETURNING 1
                )
                SELECT count(*) FROM skipped
                """
            ),
            {"rid": rollout_id},
        )
    ).scalar_one()
    if skipped:
        await conn.execute(
            text(
                "UPDATE rollouts SET pending = greatest(pending - :n, 0), updated_at = now()"
                " WHERE id = :rid"
            ),
            {"rid": rollout_id, "n": skipped},
        )
    return int(skipped)


# Per target of the batch: whether its vehicle still holds this rollout's desired state
# (`still_ours`) and whether it must report (`must_report`: it does not run its previous
# release yet); the rollback desired state of each release returned to goes in once.
_ROLLBACK_BATCH = text(
    f"""
    WITH todo AS MATERIALIZED (
        SELECT t.vehicle_id, t.state AS old_state,
               t.previous_release_version AS previous_release,
               (v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id) AS still_ours,
               (v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id
                AND t.previous_release_version IS NOT NULL
                AND v.actual_release_version
                    IS DISTINCT FROM t.previous_release_version) AS must_report,
               {ROLLBACK_DESIRED_STATE} AS rollback_desired_state_id
        FROM rollout_targets t
        JOIN vehicles v ON v.id = t.vehicle_id
        WHERE t.rollout_id = :rid AND t.vehicle_id > :after
          AND (CAST(:stage AS integer) IS NULL OR t.stage = :stage)
          AND t.state IN ('notified', 'updating', 'succeeded', 'failed', 'blocked')
          AND t.desired_state_id IS DISTINCT FROM {ROLLBACK_DESIRED_STATE}
        ORDER BY t.vehicle_id
        LIMIT :n
        FOR UPDATE OF t
    ),
    {
        desired_states_written(
            desired_state_id="rollback_desired_state_id",
            release="previous_release",
            reason=":reason",
            where="still_ours AND previous_release IS NOT NULL",
        )
    }
    vehicles_returned AS (
        UPDATE vehicles v
        SET desired_release_version = todo.previous_release,
            desired_state_id = CASE WHEN todo.previous_release IS NULL THEN NULL
                                    ELSE todo.rollback_desired_state_id END,
            status = CASE WHEN v.status = 'offline' THEN v.status
                          WHEN v.actual_release_version
                               IS NOT DISTINCT FROM todo.previous_release
                          THEN 'in_sync'
                          ELSE 'pending' END,
            updated_at = now()
        FROM todo WHERE v.id = todo.vehicle_id AND todo.still_ours
    ),
    """
    + move_targets(
        """state = CASE WHEN todo.must_report THEN 'notified' ELSE 'rolled_back' END,
               desired_state_id = CASE WHEN todo.must_report
                                       THEN todo.rollback_desired_state_id
                                       ELSE t.desired_state_id END,
               reason_code = NULL,
               notified_at = coalesce(CAST(:now AS timestamptz), now()),
               updated_at = now()""",
        sweep=True,
    )
)


async def rollback_batch(
    session: AsyncSession,
    *,
    rollout_id: int,
    batch_size: int = SWEEP_BATCH_SIZE,
    stage_index: int | None = None,
    now: datetime | None = None,
    after_vehicle_id: str = "",
    safety: SafetyGate = NO_CHECKS,
) -> SweepBatch:
    """Return the next `batch_size` issued targets (keyset after `after_vehicle_id`) to the
    desired release they had before.

    Declarative: a new desired state per release returned to (a target set: the id derives
    from the workflow id and that release, carrying `safety.constraints()`, the rollout's
    checks), which each such vehicle points to. A vehicle whose
    desired state has moved on since (another rollout or an operator) is left alone. A
    vehicle that had no known release before gets its desired state cleared. Those two, and a
    vehicle that already runs its previous release, end `rolled_back` at once; the others
    become `notified` again for the rollback desired state (the target's `desired_state_id` is
    the rollback one: that is the rollback marker; `notified_at` = `now`, so apply timeouts
    apply) and reach `rolled_back` when the vehicle reports `ready` for it
    (`outcomes.record_target_outcomes`). `stage_index` limits it to one stage (a staged
    rollback); the counters of the states left move accordingly.
    """
    return await run_sweep_batch(
        session,
        _ROLLBACK_BATCH,
        {
            "rid": rollout_id,
            "created_by": rollout_workflow_id(rollout_id),
            "reason": f"rollback of rollout {rollout_id}",
            "stage": stage_index,
            "now": now,
            "constraints": constraints_param(safety),
        },
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )
