"""Issuing a stage: the desired state goes out to the stage's vehicles, batch by batch.

A rollout's desired states are shared by a target set, their ids derived (md5 as a uuid) from
the workflow id and the set: `stage:<i>` (a stage's first issue), `retry:<k>` (every
vehicle's k-th attempt), `rollback:<release>` (every vehicle returning to that release). An
activity that runs twice therefore writes nothing new. Each carries the rollout's safety
checks as `constraints`, which the vehicle applies again.

Before a vehicle is notified its last heartbeat is judged by the rollout's safety checks
(`SafetyGate`, `SAFETY_VERDICT`); one that fails is held back, `blocked` (docs/safety.md).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.defaults import ISSUE_BATCH_SIZE
from services.safety import BATTERY_LOW, HEARTBEAT_STALE, NOT_STATIONARY, SafetyGate

# The default of the statements that take safety checks: none (nothing needs a heartbeat).
NO_CHECKS = SafetyGate()

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
    (SQL expressions over `todo`), written once (its id derives from the set), with the
    rollout's constraints (`:constraints`, JSON: `SafetyGate.constraints()`)."""
    return f"""
    desired_states_written AS (
        INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                    reason, created_by, constraints)
        SELECT DISTINCT {desired_state_id}, NULL::text, {release}, :rid, {reason}, :created_by,
               CAST(:constraints AS jsonb)
        FROM todo WHERE {where}
        ON CONFLICT (id) DO NOTHING
    ),"""


def constraints_param(safety: SafetyGate) -> str:
    """The `:constraints` parameter of the statements that write desired states."""
    return json.dumps(safety.constraints())


# The last heartbeat of vehicle `v`, as `hb` (seen_at, battery_percent, stationary): the
# fresher of its narrow row (`vehicle_telemetry`, written by every heartbeat) and its wide row
# (refreshed from the narrow one only when something visible changed, and the only one of a
# vehicle that never sent a heartbeat through the telemetry path): docs/data-model.md.
LAST_HEARTBEAT = """
    LEFT JOIN vehicle_telemetry narrow ON narrow.vehicle_id = v.id {narrow_range}
    CROSS JOIN LATERAL (
        SELECT greatest(narrow.last_seen_at, v.last_seen_at) AS seen_at,
               CASE WHEN narrow.last_seen_at >= coalesce(v.last_seen_at, '-infinity')
                    THEN narrow.battery_percent ELSE v.battery_percent END AS battery_percent,
               CASE WHEN narrow.last_seen_at >= coalesce(v.last_seen_at, '-infinity')
                    THEN narrow.stationary ELSE v.stationary END AS stationary
    ) hb
"""

# Why the server holds vehicle `v` back under a `SafetyGate` (its `params()`), from its last
# heartbeat `hb`; NULL: it passes. A check that needs a heartbeat value needs a heartbeat at
# most `offline_after_seconds` old by the database's clock (`last_seen_at` is stamped by the
# server's ingest, never by the workflow's clock, which a time-skipping test moves); an unknown
# battery or motion fails its check.
SAFETY_VERDICT = f"""
    CASE
        WHEN NOT CAST(:safety_checked AS boolean) THEN NULL
        WHEN hb.seen_at IS NULL
             OR hb.seen_at < now() - make_interval(secs => :safety_fresh_seconds)
        THEN '{HEARTBEAT_STALE}'
        WHEN :safety_min_battery > 0 AND coalesce(hb.battery_percent, -1) < :safety_min_battery
        THEN '{BATTERY_LOW}'
        WHEN CAST(:safety_stationary AS boolean) AND hb.stationary IS NOT TRUE
        THEN '{NOT_STATIONARY}'
    END"""


@dataclass(frozen=True)
class IssuedBatch:
    """One batch of a stage: targets selected, notified (`issued`), held back by the safety
    checks (`blocked`), and the last vehicle id (where the next batch starts)."""

    selected: int
    issued: int
    last_vehicle_id: str | None
    blocked: int = 0


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

# Per target of the batch still `planned`, in one statement: the safety verdict on its
# vehicle's last heartbeat (`checked`, joined in the targets' UPDATE itself); the target
# `notified`, or `blocked` with the reason (its desired state kept, to be sent when a heartbeat
# passes: sweeps.recheck_blocked); the stage's desired state written once; a notified
# vehicle's desired release, desired state and rollout, a held-back one's status and reason
# codes (its desired state untouched), in one UPDATE of the vehicles. Every table is bounded
# by the batch's range, so the planner sees `batch_size` rows on each (range scans joined by
# hash or merge, no per-row index lookups). The target and desired-state columns are
# unindexed: heap-only (HOT) updates (a held-back vehicle's reason codes are indexed: those
# few are not).
_ISSUE_BATCH = text(
    f"""
    WITH moved AS (
        UPDATE rollout_targets t
        SET state = CASE WHEN checked.blocked_reason IS NULL THEN 'notified' ELSE 'blocked' END,
            reason_code = checked.blocked_reason,
            attempt = t.attempt + CASE WHEN checked.blocked_reason IS NULL THEN 1 ELSE 0 END,
            desired_state_id = CAST(:desired_state_id AS uuid),
            notified_at = CASE WHEN checked.blocked_reason IS NULL
                               THEN coalesce(CAST(:issued_at AS timestamptz), now()) END,
            updated_at = now()
        FROM vehicles v
        {
        LAST_HEARTBEAT.format(
            narrow_range="AND narrow.vehicle_id > :after AND narrow.vehicle_id <= :last"
        )
    }
        CROSS JOIN LATERAL (SELECT {SAFETY_VERDICT} AS blocked_reason) checked
        WHERE t.rollout_id = :rid AND t.stage = :stage AND t.state = 'planned'
          AND t.vehicle_id > :after AND t.vehicle_id <= :last
          AND v.id = t.vehicle_id AND v.id > :after AND v.id <= :last
        RETURNING t.vehicle_id, t.state, t.reason_code
    ),
    desired_state AS (
        INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                    reason, created_by, constraints)
        SELECT CAST(:desired_state_id AS uuid), NULL, :release, :rid, :reason, :created_by,
               CAST(:constraints AS jsonb)
        WHERE EXISTS (SELECT 1 FROM moved)
        ON CONFLICT (id) DO NOTHING
    ),
    vehicles_moved AS (
        UPDATE vehicles v
        SET desired_release_version = CASE WHEN moved.state = 'notified' THEN :release
                                           ELSE v.desired_release_version END,
            desired_state_id = CASE WHEN moved.state = 'notified'
                                    THEN CAST(:desired_state_id AS uuid)
                                    ELSE v.desired_state_id END,
            rollout_id = CASE WHEN moved.state = 'notified' THEN CAST(:rid AS bigint)
                              ELSE v.rollout_id END,
            status = CASE WHEN v.status = 'offline' THEN v.status
                          WHEN moved.state = 'notified' THEN 'pending' ELSE 'blocked' END,
            reason_codes = CASE WHEN moved.state = 'notified' THEN v.reason_codes
                                ELSE ARRAY[moved.reason_code] END,
            updated_at = now()
        FROM moved
        WHERE v.id = moved.vehicle_id AND v.id > :after AND v.id <= :last
    )
    SELECT count(*) FILTER (WHERE state = 'notified') AS issued,
           count(*) FILTER (WHERE state = 'blocked') AS blocked
    FROM moved
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
    safety: SafetyGate = NO_CHECKS,
) -> IssuedBatch:
    """Issue the desired state to the next `batch_size` targets of one stage.

    Keyset over vehicle id after `after_vehicle_id`; only targets still `planned` inside the
    batch are issued, so a batch re-run after it committed changes nothing. One desired state
    for the whole stage (carrying `safety.constraints()`), its previous desired state and
    release kept on each target when it was planned. A target is `notified` at `issued_at`
    (the workflow's time; default now(): the start of its apply timeout).

    `safety` (default: no checks) judges each vehicle's last heartbeat first: a vehicle that
    fails a check is not notified. Its target becomes `blocked` with the reason code
    (`BATTERY_LOW`, `NOT_STATIONARY`, `HEARTBEAT_STALE`), no attempt used, pointing to the
    stage's desired state (sent when a heartbeat passes: `sweeps.recheck_blocked`); the
    vehicle keeps its desired state and becomes `blocked` with that code (`offline` stays).

    Then the rollout's counters move: `notified` by every target the batch reached (notified
    or held back: both count in the failure threshold's denominator, as a `blocked` a
    vehicle reports does), `pending` down by as many, `blocked` by those held back.
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
    moved = (
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
                "constraints": constraints_param(safety),
                **safety.params(),
            },
        )
    ).one()
    reached = int(moved.issued) + int(moved.blocked)
    if reached:
        await conn.execute(
            text(
                "UPDATE rollouts SET notified = notified + :n, pending = greatest(pending - :n, 0),"
                " blocked = blocked + :held, updated_at = now() WHERE id = :rid"
            ),
            {"rid": rollout_id, "n": reached, "held": int(moved.blocked)},
        )
    return IssuedBatch(
        selected=int(bound.selected),
        issued=int(moved.issued),
        last_vehicle_id=bound.last_vehicle_id,
        blocked=int(moved.blocked),
    )
