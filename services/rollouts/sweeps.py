"""The sweeps a rollout runs while a stage bakes, each a keyset pass over its targets in
batches (`SweepBatch`), set-based whatever the fleet size: apply timeouts expire, retryable
failures are issued again once their backoff is over, blocked vehicles that pass the safety
checks again go back to `notified`. The rollout's counters move in the same statements.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.defaults import SWEEP_BATCH_SIZE
from services.rollouts.counters import SweepBatch, move_targets, run_sweep_batch
from services.rollouts.issue import desired_states_written
from workflows.policy import RETRYABLE_REASONS, retry_backoff_seconds

# A failed target that the retry sweep may issue again (reason retryable, attempts left):
# also what `outcomes.gate_counts` counts as retryable.
RETRYABLE_TARGET = "t.reason_code = ANY(CAST(:retryable AS text[])) AND t.attempt < :max_attempts"

_EXPIRE_APPLY_TIMEOUTS = text(
    """
    WITH todo AS (
        SELECT t.vehicle_id, t.state AS old_state
        FROM rollout_targets t
        WHERE t.rollout_id = :rid AND t.vehicle_id > :after
          AND t.state IN ('notified', 'updating')
          AND t.notified_at <= CAST(:now AS timestamptz) - make_interval(secs => :apply)
        ORDER BY t.vehicle_id
        LIMIT :n
        FOR UPDATE OF t
    ),
    """
    + move_targets(
        "state = 'failed', reason_code = 'APPLY_TIMEOUT', updated_at = :now",
        sweep=True,
    )
)


async def expire_apply_timeouts(
    session: AsyncSession,
    *,
    rollout_id: int,
    now: datetime,
    apply_seconds: int,
    batch_size: int = SWEEP_BATCH_SIZE,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Targets notified or updating for longer than `apply_seconds` (since `notified_at`, by
    `now`) become failed with APPLY_TIMEOUT: the next `batch_size` of them after
    `after_vehicle_id` (a keyset pass over the rollout's primary key)."""
    return await run_sweep_batch(
        session,
        _EXPIRE_APPLY_TIMEOUTS,
        {"rid": rollout_id, "now": now, "apply": apply_seconds},
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )


# Each retried vehicle points to the desired state of its attempt (a target set), which goes
# in once; the vehicle's status is `pending` again (`offline` stays).
_RETRY_FAILED_TARGETS = text(
    f"""
    WITH todo AS MATERIALIZED (
        SELECT t.vehicle_id, t.state AS old_state, t.attempt + 1 AS attempt,
               md5(CAST(:created_by AS text) || ':retry:'
                   || (t.attempt + 1)::text)::uuid AS desired_state_id
        FROM rollout_targets t
        JOIN vehicles v ON v.id = t.vehicle_id
        WHERE t.rollout_id = :rid AND t.vehicle_id > :after
          AND t.state = 'failed' AND {RETRYABLE_TARGET}
          AND v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id
          AND t.updated_at <= CAST(:now AS timestamptz)
                              - make_interval(secs => (CAST(:backoffs AS int[]))[t.attempt])
        ORDER BY t.vehicle_id
        LIMIT :n
        FOR UPDATE OF t
    ),
    {
        desired_states_written(
            desired_state_id="desired_state_id",
            release=":release",
            reason="'retry ' || attempt::text || ' of rollout ' || CAST(:rid AS text)",
            where="true",
        )
    }
    vehicles_retried AS (
        UPDATE vehicles v
        SET desired_state_id = todo.desired_state_id, desired_release_version = :release,
            status = CASE WHEN v.status = 'offline' THEN v.status ELSE 'pending' END,
            updated_at = now()
        FROM todo WHERE v.id = todo.vehicle_id
    ),
    """
    + move_targets(
        """state = 'notified', attempt = todo.attempt, reason_code = NULL,
               desired_state_id = todo.desired_state_id, notified_at = :now, updated_at = :now""",
        sweep=True,
    )
)


def retry_backoffs(*, max_attempts: int, backoff_seconds: int) -> list[int]:
    """The wait before each retry, by the attempt that failed (1-based, as SQL arrays are):
    `policy.retry_backoff_seconds`, the rule the retry sweep runs."""
    return [
        retry_backoff_seconds(attempt, base_seconds=backoff_seconds)
        for attempt in range(1, max_attempts + 1)
    ]


async def retry_failed_targets(
    session: AsyncSession,
    *,
    rollout_id: int,
    release_version: str,
    now: datetime,
    max_attempts: int,
    backoff_seconds: int,
    batch_size: int = SWEEP_BATCH_SIZE,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Re-issue the desired state to targets that failed for a retryable reason, with
    attempts left, once their backoff (`retry_backoffs`, from the failure's `updated_at`) is
    over by `now`; the next `batch_size` after `after_vehicle_id`.

    Declarative and idempotent: a NEW desired state per attempt (a target set: every vehicle
    on its k-th attempt points to the one whose id derives from the workflow id and k), the
    target back to `notified` (attempt + 1, apply clock restarted at `now`). A vehicle whose
    desired state is no longer this rollout's (another rollout or an operator moved it) is not
    retried.
    """
    return await run_sweep_batch(
        session,
        _RETRY_FAILED_TARGETS,
        {
            "rid": rollout_id,
            "created_by": rollout_workflow_id(rollout_id),
            "release": release_version,
            "retryable": sorted(RETRYABLE_REASONS),
            "max_attempts": max_attempts,
            "now": now,
            "backoffs": retry_backoffs(max_attempts=max_attempts, backoff_seconds=backoff_seconds),
        },
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )


_RECHECK_BLOCKED = text(
    """
    WITH todo AS MATERIALIZED (
        SELECT t.vehicle_id, t.state AS old_state
        FROM rollout_targets t
        JOIN vehicles v ON v.id = t.vehicle_id
        WHERE t.rollout_id = :rid AND t.vehicle_id > :after
          AND t.state = 'blocked'
          AND v.last_seen_at >= t.updated_at
          AND coalesce(v.battery_percent, -1) >= :min_battery
          AND (NOT :stationary OR v.stationary IS TRUE)
        ORDER BY t.vehicle_id
        LIMIT :n
        FOR UPDATE OF t
    ),
    vehicles_unblocked AS (
        UPDATE vehicles v SET status = 'pending', updated_at = now()
        FROM todo WHERE v.id = todo.vehicle_id AND v.status = 'blocked'
    ),
    """
    + move_targets(
        "state = 'notified', reason_code = NULL, notified_at = :now, updated_at = :now",
        sweep=True,
    )
)


async def recheck_blocked(
    session: AsyncSession,
    *,
    rollout_id: int,
    now: datetime,
    require_stationary: bool,
    min_battery_percent: int,
    batch_size: int = SWEEP_BATCH_SIZE,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Blocked targets whose vehicle's latest heartbeat (after the block) passes the safety
    checks again (battery >= min, stationary when required) go back to `notified`, their
    apply clock restarted at `now`; the next `batch_size` after `after_vehicle_id`.

    The vehicle still holds this rollout's desired state (a block is not a failure and uses no
    attempt): it proceeds on its next poll; its status returns from blocked to pending.
    """
    return await run_sweep_batch(
        session,
        _RECHECK_BLOCKED,
        {
            "rid": rollout_id,
            "now": now,
            "min_battery": min_battery_percent,
            "stationary": require_stationary,
        },
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )
