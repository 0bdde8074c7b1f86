"""What a rollout's vehicles report, and the counts its gates judge.

Outcomes come from the telemetry path (`services/telemetry/`), in the transaction that
stores the events: a vehicle's latest event about its target's own desired state moves the
target (`notified` -> `updating` -> `succeeded`, `failed`, `blocked`). Gate counts read the
targets per state (one GROUP BY over the (rollout_id, stage, state) index), never the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.workflows import GateCounts
from services.rollouts.counters import move_targets
from services.rollouts.issue import ROLLBACK_DESIRED_STATE
from services.rollouts.sweeps import RETRYABLE_TARGET
from workflows.policy import RETRYABLE_REASONS

OUTCOME_STATES = frozenset({"updating", "succeeded", "failed", "blocked"})
# The states a gate counts (`GateCounts`' fields).
_COUNTED_STATES = ("notified", "updating", "succeeded", "failed", "blocked")

# Targets whose outcome may still change (succeeded is final for the rollout's desired state;
# planned, skipped and rolled_back are outside the rollout's live set). A `succeeded` for the
# rollback desired state is the end of the rollback: `rolled_back`.
_RECORD_OUTCOMES = text(
    f"""
    WITH todo AS (
        SELECT t.vehicle_id, t.state AS old_state,
               CASE WHEN reported.state = 'succeeded'
                     AND t.desired_state_id IS NOT DISTINCT FROM {ROLLBACK_DESIRED_STATE}
                    THEN 'rolled_back' ELSE reported.state END AS new_state,
               reported.reason_code
        FROM unnest(CAST(:vehicle_ids AS text[]), CAST(:states AS text[]),
                    CAST(:reasons AS text[]), CAST(:about AS uuid[]))
             AS reported(vehicle_id, state, reason_code, about)
        JOIN rollout_targets t ON t.rollout_id = :rid AND t.vehicle_id = reported.vehicle_id
        WHERE t.state IN ('notified', 'updating', 'failed', 'blocked')
          AND (reported.about IS NULL OR t.desired_state_id = reported.about)
          AND (t.state <> reported.state
               OR t.reason_code IS DISTINCT FROM reported.reason_code)
        ORDER BY t.vehicle_id
        FOR UPDATE OF t
    ),
    """
    + move_targets(
        """state = todo.new_state, reason_code = todo.reason_code,
               updated_at = coalesce(CAST(:at AS timestamptz), now())""",
        sweep=False,
    )
)


async def record_target_outcomes(
    session: AsyncSession,
    *,
    rollout_id: int,
    outcomes: Sequence[tuple[str, str, str | None]],
    at: datetime | None = None,
    about: Mapping[str, str] | None = None,
) -> int:
    """Record vehicles' outcomes inside one rollout, set-based: `(vehicle_id, state,
    reason_code)` with state `updating`, `succeeded`, `failed` or `blocked`; returns how many
    targets changed.

    The caller (the telemetry path) passes `succeeded` only for a `ready` on this rollout's own
    desired state. Only live targets move (notified, updating, failed, blocked): `succeeded` is
    final, and planned/skipped/rolled_back targets are left alone; the same state and reason
    again is a no-op. reason_code is kept for failed and blocked, cleared otherwise. The
    rollout's counters (updating, succeeded, failed, blocked) move in the same statement; the
    last outcome of a vehicle listed twice wins. `at` (default now()) is when it happened,
    the start of a retry's backoff. `about` (vehicle id -> desired state id: what the
    reported event is about) moves a vehicle's target only while the target holds that
    desired state (an event about another one, stale or issued outside the rollout, moves
    nothing); a vehicle not in it is not checked.
    """
    latest: dict[str, tuple[str, str | None]] = {}
    for vehicle_id, state, reason_code in outcomes:
        if state not in OUTCOME_STATES:
            raise ValueError(f"unknown outcome state {state!r} for vehicle {vehicle_id}")
        latest[vehicle_id] = (state, reason_code if state in ("failed", "blocked") else None)
    if not latest:
        return 0
    conn = await session.connection()
    moved = (
        await conn.execute(
            _RECORD_OUTCOMES,
            {
                "rid": rollout_id,
                "vehicle_ids": list(latest),
                "states": [v[0] for v in latest.values()],
                "reasons": [v[1] for v in latest.values()],
                "about": [(about or {}).get(vehicle_id) for vehicle_id in latest],
                "at": at,
                "created_by": rollout_workflow_id(rollout_id),
            },
        )
    ).scalar_one()
    return int(moved)


async def gate_counts(
    session: AsyncSession, *, rollout_id: int, stage_index: int | None, max_attempts: int
) -> GateCounts:
    """Targets per state of one stage (or the whole rollout, `stage_index` None). `retryable`:
    failed and issued again by the retry sweep once its backoff is over (a retryable reason,
    fewer than `max_attempts` issues: `sweeps.RETRYABLE_TARGET`). `rechecked`: notified again by
    the blocked re-check and not done yet (`notified` or `updating`)."""
    conn = await session.connection()
    rows = await conn.execute(
        text(
            f"""
            SELECT t.state, count(*) AS n, count(*) FILTER (WHERE {RETRYABLE_TARGET}) AS retryable,
                   count(*) FILTER (WHERE t.rechecked) AS rechecked
            FROM rollout_targets t
            WHERE t.rollout_id = :rid AND (CAST(:stage AS integer) IS NULL OR t.stage = :stage)
            GROUP BY t.state
            """
        ),
        {
            "rid": rollout_id,
            "stage": stage_index,
            "retryable": sorted(RETRYABLE_REASONS),
            "max_attempts": max_attempts,
        },
    )
    counts = GateCounts()
    for row in rows:
        if row.state in _COUNTED_STATES:
            setattr(counts, row.state, int(row.n))
        if row.state == "failed":
            counts.retryable = int(row.retryable)
        if row.state in ("notified", "updating"):
            counts.rechecked += int(row.rechecked)
    return counts


async def rollback_gate_counts(
    session: AsyncSession, *, rollout_id: int, stage_index: int | None
) -> GateCounts:
    """The rollback's own outcomes (one stage or all): only targets in the rollback phase
    (desired_state_id the rollback one) or done with it (`rolled_back`, counted as
    succeeded). Forward outcomes are not mixed in: a rolled-back target's forward state was
    overwritten when it was sent back."""
    conn = await session.connection()
    rows = await conn.execute(
        text(
            f"""
            SELECT t.state, count(*) AS n
            FROM rollout_targets t
            WHERE t.rollout_id = :rid
              AND (CAST(:stage AS integer) IS NULL OR t.stage = :stage)
              AND (t.state = 'rolled_back' OR t.desired_state_id = {ROLLBACK_DESIRED_STATE})
            GROUP BY t.state
            """
        ),
        {"rid": rollout_id, "stage": stage_index, "created_by": rollout_workflow_id(rollout_id)},
    )
    counts = GateCounts()
    for row in rows:
        state = "succeeded" if row.state == "rolled_back" else row.state
        if state in _COUNTED_STATES:
            setattr(counts, state, getattr(counts, state) + int(row.n))
    return counts
