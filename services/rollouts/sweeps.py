"""The sweeps a rollout runs while a stage bakes, each a keyset pass over its targets in
batches (`SweepBatch`), set-based whatever the fleet size: apply timeouts expire, retryable
failures are issued again once their backoff is over, blocked vehicles whose last heartbeat
passes the safety checks are notified. The rollout's counters move in the same statements.
The reconcile runs the blocked re-check too, for completed rollouts (docs/safety.md).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.defaults import SWEEP_BATCH_SIZE
from services.rollouts.counters import SweepBatch, move_targets, run_sweep_batch
from services.rollouts.issue import (
    LAST_HEARTBEAT,
    NO_CHECKS,
    SAFETY_VERDICT,
    constraints_param,
    desired_states_written,
)
from services.safety import SafetyGate
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
        """state = 'notified', attempt = todo.attempt, reason_code = NULL, rechecked = false,
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
    safety: SafetyGate = NO_CHECKS,
) -> SweepBatch:
    """Re-issue the desired state to targets that failed for a retryable reason, with
    attempts left, once their backoff (`retry_backoffs`, from the failure's `updated_at`) is
    over by `now`; the next `batch_size` after `after_vehicle_id`.

    Declarative and idempotent: a NEW desired state per attempt (a target set: every vehicle
    on its k-th attempt points to the one whose id derives from the workflow id and k,
    carrying `safety.constraints()`), the target back to `notified` (attempt + 1, apply clock
    restarted at `now`). A vehicle whose desired state is no longer this rollout's (another
    rollout or an operator moved it) is not retried.
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
            "constraints": constraints_param(safety),
        },
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )


# Per blocked target: whether a later assignment took its vehicle (`superseded`: the vehicle
# no longer holds the desired state it had when the target was held back, or this rollout's,
# or a later rollout targets it), the safety verdict on its vehicle's last heartbeat
# (`reason`, NULL: it passes) and whether that verdict is news (`fresh`: a held-back target is
# judged on any heartbeat; one whose vehicle reported `blocked` only on a heartbeat since).
# Only the targets with something to change are taken, so the keyset pass moves on: a new
# verdict, or a held-back vehicle whose status no longer says so (an event, or the offline
# marking and a heartbeat after it, derived it again: services/vehicle_status.py). The status
# of a vehicle that reported its block itself is its events' (derived), unless the reason
# changes.
_RECHECK_BLOCKED = text(
    f"""
    WITH todo AS MATERIALIZED (
        SELECT t.vehicle_id, t.state AS old_state, t.desired_state_id,
               ds.release_version AS release, judged.superseded, judged.reason
        FROM rollout_targets t
        JOIN vehicles v ON v.id = t.vehicle_id
        JOIN desired_states ds ON ds.id = t.desired_state_id
        {LAST_HEARTBEAT.format(narrow_range="")}
        CROSS JOIN LATERAL (
            SELECT v.desired_state_id IS DISTINCT FROM (CASE WHEN t.attempt = 0
                                                             THEN t.previous_desired_state_id
                                                             ELSE t.desired_state_id END)
                   OR EXISTS (
                       SELECT 1 FROM rollouts later
                       JOIN rollout_targets taken
                         ON taken.rollout_id = later.id AND taken.vehicle_id = t.vehicle_id
                       WHERE later.id > :rid AND taken.state <> 'skipped') AS superseded,
                   {SAFETY_VERDICT} AS reason,
                   (t.attempt = 0 OR hb.seen_at >= t.updated_at) AS fresh
        ) judged
        WHERE t.rollout_id = :rid AND t.vehicle_id > :after AND t.state = 'blocked'
          AND (judged.superseded
               OR (judged.fresh
                   AND (judged.reason IS NULL
                        OR judged.reason IS DISTINCT FROM t.reason_code
                        OR (t.attempt = 0 AND (v.status NOT IN ('blocked', 'offline')
                                               OR v.reason_codes <> ARRAY[judged.reason])))))
        ORDER BY t.vehicle_id
        LIMIT :n
        FOR UPDATE OF t
    ),
    vehicles_notified AS (
        UPDATE vehicles v
        SET desired_release_version = todo.release, desired_state_id = todo.desired_state_id,
            rollout_id = :rid,
            status = CASE WHEN v.status = 'offline' THEN v.status ELSE 'pending' END,
            reason_codes = '{{}}', updated_at = now()
        FROM todo WHERE v.id = todo.vehicle_id AND NOT todo.superseded AND todo.reason IS NULL
    ),
    vehicles_held AS (
        UPDATE vehicles v
        SET status = CASE WHEN v.status = 'offline' THEN v.status ELSE 'blocked' END,
            reason_codes = ARRAY[todo.reason], updated_at = now()
        FROM todo
        WHERE v.id = todo.vehicle_id AND NOT todo.superseded AND todo.reason IS NOT NULL
    ),
    """
    + move_targets(
        """state = CASE WHEN todo.superseded THEN 'skipped'
                        WHEN todo.reason IS NULL THEN 'notified' ELSE 'blocked' END,
               reason_code = CASE WHEN todo.superseded THEN 'SUPERSEDED' ELSE todo.reason END,
               attempt = CASE WHEN NOT todo.superseded AND todo.reason IS NULL
                              THEN greatest(t.attempt, 1) ELSE t.attempt END,
               rechecked = t.rechecked OR (NOT todo.superseded AND todo.reason IS NULL),
               notified_at = CASE WHEN NOT todo.superseded AND todo.reason IS NULL
                                  THEN :now ELSE t.notified_at END,
               updated_at = CASE WHEN NOT todo.superseded AND todo.reason IS NULL
                                 THEN :now ELSE now() END""",
        sweep=True,
    )
)


async def recheck_blocked(
    session: AsyncSession,
    *,
    rollout_id: int,
    now: datetime,
    safety: SafetyGate,
    batch_size: int = SWEEP_BATCH_SIZE,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Blocked targets judged again by `safety` (the checks issuing applies,
    `issue.SAFETY_VERDICT`, staleness included) on their vehicle's last heartbeat; the next
    `batch_size` with something to change after `after_vehicle_id`:

    - it passes: the target is `notified` (apply clock restarted at `now`); the vehicle gets
      the target's desired state (release, id, rollout: a vehicle the server held back never
      had it; one that reported `blocked` holds it already) and `pending` (`offline` stays).
      A held-back target uses its first attempt now; a reported block used one already.
    - a check fails: the target stays `blocked`, its reason code the failing check's, and so
      does the vehicle's status and reason codes (`offline` stays).
    - the vehicle was taken by a later assignment (a direct desired state, another rollout):
      the target is `skipped` with `SUPERSEDED`; the vehicle is left alone.

    A target whose vehicle reported `blocked` itself is judged only on a heartbeat newer than
    the block; one the server held back on any heartbeat. Rollout counters move in the same
    statement (`blocked` down by those notified or skipped).
    """
    return await run_sweep_batch(
        session,
        _RECHECK_BLOCKED,
        {"rid": rollout_id, "now": now, **safety.params()},
        batch_size=batch_size,
        after_vehicle_id=after_vehicle_id,
    )
