"""Every SQL statement of the rollout workflow's path: planning, target expansion, issuing
desired states stage by stage, status changes (with their audit entry and change-feed event).

Vehicle lists never leave PostgreSQL: each function is a few set-based statements whatever the
fleet size. Functions take keyword-only arguments and an `AsyncSession`; they only flush, the
caller (an activity, or an API request) owns the transaction. All of them are idempotent: an
activity that runs twice leaves the same rows as one that ran once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import RolloutNotFound, TargetsChanged
from core.temporal import rollout_workflow_id
from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus
from models.workflows import GateCounts, RolloutCounts, RolloutPolicy, StagePlan
from services import audit as audit_log
from services import change_feed
from services.rollouts import AuditScope, audit_scope
from services.targets import REQUEST_MATCH, match_params
from workflows.policy import (
    MAX_BACKOFF_SECONDS,
    RETRYABLE_REASONS,
    plan_from_strategy,
    rollout_policy,
    stage_ends,
)

SWEEP_BATCH = 1000


@dataclass(frozen=True)
class RolloutRow:
    id: int
    release_version: str
    status: str
    targets: dict[str, Any]
    strategy: dict[str, Any]
    targeted: int
    stage_count: int
    correlation_id: str | None


@dataclass(frozen=True)
class Expansion:
    targeted: int
    stages: list[StagePlan]
    counts_per_stage: list[int]
    inserted: bool


@dataclass(frozen=True)
class IssuedBatch:
    selected: int
    issued: int
    last_vehicle_id: str | None


@dataclass(frozen=True)
class SweepBatch:
    """One keyset batch of a sweep over a rollout's targets: how many targets it changed,
    whether it reached the end, and the vehicle id where the next batch starts."""

    changed: int
    done: bool
    last_vehicle_id: str


async def _conn(session: AsyncSession) -> AsyncConnection:
    return await session.connection()


_COUNTS_COLUMNS = "targeted, notified, updating, succeeded, failed, blocked, pending"

# The tail of a statement whose CTE `moved` returns (old_state, new_state) per target it moved:
# moves the rollout's current-state counters (updating, succeeded, failed, blocked) by the
# difference, in the same statement, and answers how many targets moved. Counters, not scans.
# Desired states a rollout writes are shared by a target set, their ids derived (md5 as a
# uuid) from the workflow id and the set: `stage:<i>` (a stage's first issue), `retry:<k>`
# (every vehicle's k-th attempt), `rollback:<release>` (every vehicle returning to that
# release). The rollback desired state of a target: a target whose desired_state_id is this one
# is in the rollback phase.
_ROLLBACK_DS = (
    "md5(CAST(:created_by AS text) || ':rollback:'"
    " || coalesce(t.previous_release_version, ''))::uuid"
)


def target_set_desired_state_id(rollout_id: int, target_set: str) -> uuid.UUID:
    """The id of the desired state a rollout writes for a target set (see `_ROLLBACK_DS`)."""
    key = f"{rollout_workflow_id(rollout_id)}:{target_set}"
    return uuid.UUID(hashlib.md5(key.encode()).hexdigest())


_COUNTER_DELTAS = """
    d AS (
        SELECT count(*) AS n,
               count(*) FILTER (WHERE new_state = 'updating')
                 - count(*) FILTER (WHERE old_state = 'updating') AS d_updating,
               count(*) FILTER (WHERE new_state = 'succeeded')
                 - count(*) FILTER (WHERE old_state = 'succeeded') AS d_succeeded,
               count(*) FILTER (WHERE new_state = 'failed')
                 - count(*) FILTER (WHERE old_state = 'failed') AS d_failed,
               count(*) FILTER (WHERE new_state = 'blocked')
                 - count(*) FILTER (WHERE old_state = 'blocked') AS d_blocked
        FROM moved
    ),
    upr AS (
        UPDATE rollouts r
        SET updating = greatest(r.updating + d.d_updating, 0),
            succeeded = greatest(r.succeeded + d.d_succeeded, 0),
            failed = greatest(r.failed + d.d_failed, 0),
            blocked = greatest(r.blocked + d.d_blocked, 0),
            updated_at = now()
        FROM d WHERE r.id = :rid AND d.n > 0
        RETURNING 1
    )
    SELECT n FROM d
"""

# The same tail for a keyset sweep over `todo` (ordered by vehicle id, LIMIT :n): also how many
# targets the batch selected and the last vehicle id, where the next batch starts.
_COUNTER_DELTAS_KEYSET = (
    _COUNTER_DELTAS.removesuffix("    SELECT n FROM d\n")
    + """    SELECT (SELECT n FROM d) AS changed,
           (SELECT count(*) FROM todo) AS selected,
           (SELECT max(vehicle_id) FROM todo) AS last_vehicle_id
"""
)


def _sweep_batch(row: Any, batch_size: int, after_vehicle_id: str) -> SweepBatch:
    selected = int(row.selected)
    return SweepBatch(
        changed=int(row.changed),
        done=selected < batch_size,
        last_vehicle_id=row.last_vehicle_id or after_vehicle_id,
    )


async def load_rollout(
    session: AsyncSession, *, rollout_id: int, for_update: bool = False
) -> RolloutRow:
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
                "SELECT id, release_version, status, targets, strategy, targeted, stage_count,"
                " correlation_id FROM rollouts WHERE id = :rid"
                + (" FOR UPDATE" if for_update else "")
            ),
            {"rid": rollout_id},
        )
    ).one_or_none()
    if row is None:
        raise RolloutNotFound(f"rollout {rollout_id} does not exist")
    return RolloutRow(
        id=row.id,
        release_version=row.release_version,
        status=row.status,
        targets=_as_dict(row.targets),
        strategy=_as_dict(row.strategy),
        targeted=row.targeted,
        stage_count=row.stage_count,
        correlation_id=row.correlation_id,
    )


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value or {})


async def count_matching_vehicles(session: AsyncSession, *, targets: dict[str, Any]) -> int:
    """How many vehicles a rollout's `targets` select (for planning and `dryRun`)."""
    conn = await _conn(session)
    result = await conn.execute(
        text(f"SELECT count(*) FROM vehicles v WHERE {REQUEST_MATCH}"), match_params(targets)
    )
    return int(result.scalar_one())


async def plan_rollout(session: AsyncSession, *, rollout_id: int) -> list[StagePlan]:
    """The stage plan of a rollout as it would be expanded now (read-only; for `dryRun`)."""
    rollout = await load_rollout(session, rollout_id=rollout_id)
    if rollout.stage_count > 0:
        return plan_from_strategy(rollout.targeted, rollout.strategy)
    targeted = await count_matching_vehicles(session, targets=rollout.targets)
    return plan_from_strategy(targeted, rollout.strategy)


async def expand_targets(
    session: AsyncSession, *, rollout_id: int, ends: Sequence[int], targets: dict[str, Any]
) -> list[int]:
    """Insert one `rollout_targets` row per matching vehicle, in one statement.

    `rank` is the vehicle's deterministic position in the rollout (md5 of rollout and vehicle
    id, ties by id), `stage` the first stage whose cumulative end rank `ends[i]` exceeds it
    (`width_bucket`: how many ends are <= rank). Each target keeps the vehicle's desired state
    and release of now, what a rollback returns it to: no other rollout and no direct desired
    state can change them while this rollout is active (the overlap rule), so they are still
    the vehicle's when its stage is issued.
    Sets `targeted`, `pending`, `stage_count`
    on the rollout; returns the number of targets per stage.
    """
    conn = await _conn(session)
    # The rank sort of a million ids stays in memory; inserted in vehicle id order, the rows
    # fill the primary key and the stage index front to back instead of at random. Both sorts
    # compare bytes (COLLATE "C": the hex digest and ids sort the same, much faster); the
    # target lists are bound parameters, so an empty one is folded away when planning.
    # A plain INSERT: the caller holds the rollout's row lock and expands only once.
    await conn.execute(text("SET LOCAL work_mem = '256MB'"))
    await conn.execute(
        text(
            f"""
            WITH matched AS (
                SELECT v.id, v.desired_state_id,
                       coalesce(v.desired_release_version, v.actual_release_version)
                           AS previous_release,
                       row_number() OVER (
                           ORDER BY md5(CAST(:rid AS text) || ':' || v.id) COLLATE "C",
                                    v.id COLLATE "C"
                       ) - 1 AS rank
                FROM vehicles v
                WHERE {REQUEST_MATCH}
            )
            INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state,
                                         previous_desired_state_id, previous_release_version)
            SELECT :rid, m.id, width_bucket(m.rank, CAST(:ends AS bigint[])), m.rank, 'planned',
                   m.desired_state_id, m.previous_release
            FROM matched m
            ORDER BY m.id COLLATE "C"
            """
        ),
        {"rid": rollout_id, "ends": list(ends), **match_params(targets)},
    )
    counts = [0] * len(ends)
    rows = await conn.execute(
        text(
            "SELECT stage, count(*) AS n FROM rollout_targets WHERE rollout_id = :rid"
            " GROUP BY stage"
        ),
        {"rid": rollout_id},
    )
    for stage, n in rows:
        if 0 <= stage < len(counts):
            counts[stage] = int(n)
    targeted = sum(counts)
    await conn.execute(
        text(
            "UPDATE rollouts SET targeted = :targeted, pending = :targeted - notified,"
            " stage_count = :stage_count, updated_at = now() WHERE id = :rid"
        ),
        {"rid": rollout_id, "targeted": targeted, "stage_count": len(ends)},
    )
    return counts


async def plan_and_expand(session: AsyncSession, *, rollout_id: int) -> Expansion:
    """Plan the rollout and expand its targets, once: a second call returns the same plan.

    Locks the rollout row; counts the matching vehicles, plans the stages (pure policy) and
    inserts the targets in the same transaction. If the fleet changed between the count and
    the insert, raises `TargetsChanged` (the caller rolls back and retries).
    """
    rollout = await load_rollout(session, rollout_id=rollout_id, for_update=True)
    if rollout.stage_count > 0:  # expanded by an earlier attempt
        stages = plan_from_strategy(rollout.targeted, rollout.strategy)
        return Expansion(
            targeted=rollout.targeted,
            stages=stages,
            counts_per_stage=[s.size for s in stages],
            inserted=False,
        )
    targeted = await count_matching_vehicles(session, targets=rollout.targets)
    stages = plan_from_strategy(targeted, rollout.strategy)
    counts = await expand_targets(
        session, rollout_id=rollout_id, ends=stage_ends(stages), targets=rollout.targets
    )
    # Fresh statistics for the rows just inserted: the issue batches' plans depend on them
    # (autovacuum's analyze may come much later, or never where it is off).
    await (await _conn(session)).execute(text("ANALYZE rollout_targets"))
    if counts != [s.size for s in stages]:
        raise TargetsChanged(
            f"rollout {rollout_id}: planned {[s.size for s in stages]}, inserted {counts}"
        )
    return Expansion(targeted=targeted, stages=stages, counts_per_stage=counts, inserted=True)


async def issue_stage_batch(
    session: AsyncSession,
    *,
    rollout_id: int,
    stage_index: int,
    release_version: str,
    after_vehicle_id: str = "",
    batch_size: int = 5000,
    issued_at: datetime | None = None,
) -> IssuedBatch:
    """Issue the desired state to the next `batch_size` targets of one stage.

    Keyset over vehicle id after `after_vehicle_id` (the stage index gives the batch's upper
    bound); only targets still `planned` inside it are issued, so a batch re-run after it
    committed changes nothing. One desired state for the whole stage (a target set, id from
    workflow id and stage), written once; per vehicle, in one statement: the vehicle's desired
    release, desired state and rollout (its previous ones were kept on the target when it was
    planned), and the target `notified` at `issued_at` (the workflow's time; default now():
    the start of its apply timeout). Both updates change no indexed column: heap-only (HOT)
    updates. Then the rollout's counters move by the number issued.
    """
    created_by = rollout_workflow_id(rollout_id)
    ds_id = target_set_desired_state_id(rollout_id, f"stage:{stage_index}")
    conn = await _conn(session)
    # The batch's bounds first, as values: the planner then sees a range of `batch_size` rows
    # on both tables (a CTE's bound would look like a third of the fleet: a sequential scan).
    bound = (
        await conn.execute(
            text(
                """
                SELECT count(*) AS selected, max(vehicle_id) AS last
                FROM (
                    SELECT vehicle_id FROM rollout_targets
                    WHERE rollout_id = :rid AND stage = :stage AND vehicle_id > :after
                    ORDER BY vehicle_id
                    LIMIT :n
                ) b
                """
            ),
            {"rid": rollout_id, "stage": stage_index, "after": after_vehicle_id, "n": batch_size},
        )
    ).one()
    if not bound.selected:
        return IssuedBatch(selected=0, issued=0, last_vehicle_id=None)
    issued = (
        await conn.execute(
            text(
                """
                WITH upt AS (
                    UPDATE rollout_targets t
                    SET state = 'notified',
                        attempt = t.attempt + 1,
                        desired_state_id = CAST(:ds_id AS uuid),
                        notified_at = coalesce(CAST(:issued_at AS timestamptz), now()),
                        updated_at = now()
                    WHERE t.rollout_id = :rid AND t.stage = :stage AND t.state = 'planned'
                      AND t.vehicle_id > :after AND t.vehicle_id <= :last
                    RETURNING t.vehicle_id
                ),
                ins AS (
                    INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                                reason, created_by)
                    SELECT CAST(:ds_id AS uuid), NULL, :release, :rid, :reason, :created_by
                    WHERE EXISTS (SELECT 1 FROM upt)
                    ON CONFLICT (id) DO NOTHING
                ),
                upv AS (
                    UPDATE vehicles v
                    SET desired_release_version = :release,
                        desired_state_id = CAST(:ds_id AS uuid),
                        rollout_id = :rid,
                        status = CASE WHEN v.status = 'offline' THEN v.status
                                      ELSE 'pending' END,
                        updated_at = now()
                    FROM upt
                    WHERE v.id = upt.vehicle_id AND v.id > :after AND v.id <= :last
                )
                SELECT count(*) FROM upt
                """
            ),
            {
                "rid": rollout_id,
                "stage": stage_index,
                "after": after_vehicle_id,
                "last": bound.last,
                "release": release_version,
                "ds_id": str(ds_id),
                "created_by": created_by,
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
    return IssuedBatch(selected=int(bound.selected), issued=int(issued), last_vehicle_id=bound.last)


async def progress(session: AsyncSession, *, rollout_id: int) -> RolloutCounts:
    """The rollout's counters, read from its row (never a scan of its targets)."""
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(f"SELECT {_COUNTS_COLUMNS} FROM rollouts WHERE id = :rid"), {"rid": rollout_id}
        )
    ).one_or_none()
    if row is None:
        raise RolloutNotFound(f"rollout {rollout_id} does not exist")
    return RolloutCounts.model_validate(row._asdict())


async def _scope(conn: AsyncConnection, rollout_id: int) -> AuditScope:
    targets = (
        await conn.execute(
            text("SELECT targets FROM rollouts WHERE id = :rid"), {"rid": rollout_id}
        )
    ).scalar_one()
    return audit_scope(_as_dict(targets))


async def record_rollout_event(
    session: AsyncSession,
    *,
    rollout_id: int,
    action: str,
    payload: dict[str, Any],
    actor: str = "workflow",
    source: str = "system",
    reason: str | None = None,
    correlation_id: str | None = None,
    result: str = "ok",
    audit: bool = True,
) -> None:
    """An audit entry (optional) and a `rollout.updated` change-feed event, in the caller's
    transaction."""
    if audit:
        await audit_log.record(
            session,
            actor=actor,
            role=None,
            source=AuditSource(source),
            action=action,
            target_type="rollout",
            target_id=str(rollout_id),
            reason=reason,
            correlation_id=correlation_id,
            payload=payload,
            result=result,
            **await _scope(await _conn(session), rollout_id),
        )
    await change_feed.publish(
        session,
        topic="rollouts",
        event="rollout.updated",
        entity_id=str(rollout_id),
        payload=payload,
    )


async def rollout_snapshot(session: AsyncSession, *, rollout_id: int) -> dict[str, Any]:
    """The change-feed payload of a rollout: `{id, status, statusReason, stage, stageIndex,
    stageCount, waitingFor, counts}` (camelCase, as the API renders it)."""
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
                "SELECT id, status, status_reason, stage, stage_index, stage_count, waiting_for,"
                f" {_COUNTS_COLUMNS} FROM rollouts WHERE id = :rid"
            ),
            {"rid": rollout_id},
        )
    ).one()
    data = row._asdict()
    return {
        "id": data["id"],
        "status": data["status"],
        "statusReason": data["status_reason"],
        "stage": data["stage"],
        "stageIndex": data["stage_index"],
        "stageCount": data["stage_count"],
        "waitingFor": data["waiting_for"],
        "counts": RolloutCounts.model_validate(data).model_dump(),
    }


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
    actor: str = "workflow",
    source: str = "system",
    reason: str | None = None,
    correlation_id: str | None = None,
    audit: bool = True,
) -> bool:
    """Write the rollout's status (and stage, reason, what it waits for); when anything
    changed, add the audit entry `action` and a `rollout.updated` event. Returns whether it
    changed (False for a re-run of the same change: idempotent).

    `stage`/`stage_index` None keep the current ones. `started_at` is set on the first
    `running`, `finished_at` on a terminal status.
    """
    RolloutStatus(status)  # refuses an unknown status
    conn = await _conn(session)
    current = (
        await conn.execute(
            text(
                "SELECT status, status_reason, stage, stage_index, waiting_for FROM rollouts"
                " WHERE id = :rid FOR UPDATE"
            ),
            {"rid": rollout_id},
        )
    ).one_or_none()
    if current is None:
        raise RolloutNotFound(f"rollout {rollout_id} does not exist")
    new_stage = current.stage if stage is None else stage
    new_index = current.stage_index if stage_index is None else stage_index
    if (current.status, current.status_reason, current.stage, current.stage_index) == (
        status,
        status_reason,
        new_stage,
        new_index,
    ) and current.waiting_for == waiting_for:
        return False
    terminal = RolloutStatus(status) in TERMINAL_ROLLOUT_STATUSES
    await conn.execute(
        text(
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
        ),
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
    transition = (current.status, current.stage) != (status, new_stage)
    await record_rollout_event(
        session,
        rollout_id=rollout_id,
        action=action,
        payload=snapshot,
        actor=actor,
        source=source,
        reason=reason,
        correlation_id=correlation_id,
        audit=audit and transition,
    )
    return True


async def skip_planned_targets(session: AsyncSession, *, rollout_id: int) -> int:
    """Mark the targets never issued as `skipped` (abort, rollback); returns how many."""
    conn = await _conn(session)
    skipped = (
        await conn.execute(
            text(
                """
                WITH s AS (
                    UPDATE rollout_targets SET state = 'skipped', updated_at = now()
                    WHERE rollout_id = :rid AND state = 'planned'
                    RETURNING 1
                )
                SELECT count(*) FROM s
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


async def rollback_batch(
    session: AsyncSession,
    *,
    rollout_id: int,
    batch_size: int = SWEEP_BATCH,
    stage_index: int | None = None,
    now: datetime | None = None,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Return the next `batch_size` issued targets (keyset after `after_vehicle_id`) to the
    desired release they had before.

    Declarative: a new desired state per release returned to (a target set: the id derives
    from the workflow id and that release), which each such vehicle points to. A vehicle whose
    desired state has moved on since (another rollout or an operator) is left alone. A
    vehicle that had no known release before gets its desired state cleared. Those two, and a
    vehicle that already runs its previous release, end `rolled_back` at once; the others
    become `notified` again for the rollback desired state (the target's `desired_state_id` is
    the rollback one: that is the rollback marker; `notified_at` = `now`, so apply timeouts
    apply) and reach `rolled_back` when the vehicle reports `ready` for it
    (`record_target_outcomes`). `stage_index` limits it to one stage (a staged rollback); the
    counters of the states left move accordingly.
    """
    created_by = rollout_workflow_id(rollout_id)
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
                f"""
                WITH todo AS MATERIALIZED (
                    SELECT t.vehicle_id, t.state AS old_state, t.desired_state_id AS our_ds,
                           t.previous_release_version AS prev_release,
                           (v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id)
                               AS still_ours,
                           (v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id
                            AND t.previous_release_version IS NOT NULL
                            AND v.actual_release_version
                                IS DISTINCT FROM t.previous_release_version) AS must_report,
                           {_ROLLBACK_DS} AS ds_id
                    FROM rollout_targets t
                    JOIN vehicles v ON v.id = t.vehicle_id
                    WHERE t.rollout_id = :rid AND t.vehicle_id > :after
                      AND (CAST(:stage AS integer) IS NULL OR t.stage = :stage)
                      AND t.state IN ('notified', 'updating', 'succeeded', 'failed', 'blocked')
                      AND t.desired_state_id IS DISTINCT FROM {_ROLLBACK_DS}
                    ORDER BY t.vehicle_id
                    LIMIT :n
                    FOR UPDATE OF t
                ),
                ins AS (
                    INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                                reason, created_by)
                    SELECT DISTINCT ds_id, NULL::text, prev_release, :rid, :reason, :created_by
                    FROM todo WHERE still_ours AND prev_release IS NOT NULL
                    ON CONFLICT (id) DO NOTHING
                ),
                upv AS (
                    UPDATE vehicles v
                    SET desired_release_version = todo.prev_release,
                        desired_state_id = CASE WHEN todo.prev_release IS NULL THEN NULL
                                                ELSE todo.ds_id END,
                        status = CASE WHEN v.status = 'offline' THEN v.status
                                      WHEN v.actual_release_version
                                           IS NOT DISTINCT FROM todo.prev_release
                                      THEN 'in_sync'
                                      ELSE 'pending' END,
                        updated_at = now()
                    FROM todo WHERE v.id = todo.vehicle_id AND todo.still_ours
                ),
                moved AS (
                    UPDATE rollout_targets t
                    SET state = CASE WHEN todo.must_report
                                     THEN 'notified' ELSE 'rolled_back' END,
                        desired_state_id = CASE WHEN todo.must_report
                                                THEN todo.ds_id ELSE t.desired_state_id END,
                        reason_code = NULL,
                        notified_at = coalesce(CAST(:now AS timestamptz), now()),
                        updated_at = now()
                    FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
                    RETURNING todo.old_state, t.state AS new_state
                ),
                """
                + _COUNTER_DELTAS_KEYSET
            ),
            {
                "rid": rollout_id,
                "n": batch_size,
                "after": after_vehicle_id,
                "created_by": created_by,
                "reason": f"rollback of rollout {rollout_id}",
                "stage": stage_index,
                "now": now,
            },
        )
    ).one()
    return _sweep_batch(row, batch_size, after_vehicle_id)


# --- Execution: per-vehicle outcomes, gates, timeouts, retries, blocked rechecks -------------

OUTCOME_STATES = frozenset({"updating", "succeeded", "failed", "blocked"})
# Targets whose outcome may still change (succeeded is final for the rollout's desired state;
# planned, skipped and rolled_back are outside the rollout's live set).
_LIVE_STATES = "('notified', 'updating', 'failed', 'blocked')"


async def load_policy(session: AsyncSession, *, rollout_id: int) -> RolloutPolicy:
    """The rollout's gates, safety checks, timeouts and retry settings (pure parsing in
    `workflows.policy.rollout_policy`)."""
    conn = await _conn(session)
    row = (
        await conn.execute(
            text("SELECT gates, timeouts, retry FROM rollouts WHERE id = :rid"),
            {"rid": rollout_id},
        )
    ).one_or_none()
    if row is None:
        raise RolloutNotFound(f"rollout {rollout_id} does not exist")
    return rollout_policy(_as_dict(row.gates), _as_dict(row.timeouts), _as_dict(row.retry))


async def record_target_outcomes(
    session: AsyncSession,
    *,
    rollout_id: int,
    outcomes: Sequence[tuple[str, str, str | None]],
    at: datetime | None = None,
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
    the start of a retry's backoff.
    """
    latest: dict[str, tuple[str, str | None]] = {}
    for vehicle_id, state, reason_code in outcomes:
        if state not in OUTCOME_STATES:
            raise ValueError(f"unknown outcome state {state!r} for vehicle {vehicle_id}")
        latest[vehicle_id] = (state, reason_code if state in ("failed", "blocked") else None)
    if not latest:
        return 0
    conn = await _conn(session)
    moved = (
        await conn.execute(
            text(
                f"""
                WITH todo AS (
                    SELECT t.vehicle_id, t.state AS old_state,
                           CASE WHEN o.state = 'succeeded'
                                 AND t.desired_state_id IS NOT DISTINCT FROM {_ROLLBACK_DS}
                                THEN 'rolled_back' ELSE o.state END AS new_state,
                           o.reason_code
                    FROM unnest(CAST(:vids AS text[]), CAST(:states AS text[]),
                                CAST(:reasons AS text[])) AS o(vehicle_id, state, reason_code)
                    JOIN rollout_targets t
                      ON t.rollout_id = :rid AND t.vehicle_id = o.vehicle_id
                    WHERE t.state IN {_LIVE_STATES}
                      AND (t.state <> o.state OR t.reason_code IS DISTINCT FROM o.reason_code)
                    ORDER BY t.vehicle_id
                    FOR UPDATE OF t
                ),
                moved AS (
                    UPDATE rollout_targets t
                    SET state = todo.new_state, reason_code = todo.reason_code,
                        updated_at = coalesce(CAST(:at AS timestamptz), now())
                    FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
                    RETURNING todo.old_state, t.state AS new_state
                ),
                """
                + _COUNTER_DELTAS
            ),
            {
                "rid": rollout_id,
                "vids": list(latest),
                "states": [v[0] for v in latest.values()],
                "reasons": [v[1] for v in latest.values()],
                "at": at,
                "created_by": rollout_workflow_id(rollout_id),
            },
        )
    ).scalar_one()
    return int(moved)


async def gate_counts(
    session: AsyncSession, *, rollout_id: int, stage_index: int | None, max_attempts: int = 2
) -> GateCounts:
    """Targets per state of one stage (or the whole rollout, `stage_index` None): one GROUP BY
    over the (rollout_id, stage, state) index, never the event table. `retryable`: failed
    with a retryable reason and fewer than `max_attempts` issues."""
    conn = await _conn(session)
    rows = await conn.execute(
        text(
            """
            SELECT state, count(*) AS n,
                   count(*) FILTER (WHERE reason_code = ANY(CAST(:retryable AS text[]))
                                      AND attempt < :max) AS retryable
            FROM rollout_targets
            WHERE rollout_id = :rid AND (CAST(:stage AS integer) IS NULL OR stage = :stage)
            GROUP BY state
            """
        ),
        {
            "rid": rollout_id,
            "stage": stage_index,
            "retryable": sorted(RETRYABLE_REASONS),
            "max": max_attempts,
        },
    )
    counts = GateCounts()
    for row in rows:
        if row.state in ("notified", "updating", "succeeded", "failed", "blocked"):
            setattr(counts, row.state, int(row.n))
        if row.state == "failed":
            counts.retryable = int(row.retryable)
    return counts


async def rollback_gate_counts(
    session: AsyncSession, *, rollout_id: int, stage_index: int | None
) -> GateCounts:
    """The rollback's own outcomes (one stage or all): only targets in the rollback phase
    (desired_state_id the rollback one) or done with it (`rolled_back`, counted as
    succeeded). Forward outcomes are not mixed in: a rolled-back target's forward state was
    overwritten when it was sent back."""
    conn = await _conn(session)
    rows = await conn.execute(
        text(
            f"""
            SELECT t.state, count(*) AS n
            FROM rollout_targets t
            WHERE t.rollout_id = :rid
              AND (CAST(:stage AS integer) IS NULL OR t.stage = :stage)
              AND (t.state = 'rolled_back' OR t.desired_state_id = {_ROLLBACK_DS})
            GROUP BY t.state
            """
        ),
        {"rid": rollout_id, "stage": stage_index, "created_by": rollout_workflow_id(rollout_id)},
    )
    counts = GateCounts()
    for row in rows:
        state = "succeeded" if row.state == "rolled_back" else row.state
        if state in ("notified", "updating", "succeeded", "failed", "blocked"):
            setattr(counts, state, getattr(counts, state) + int(row.n))
    return counts


async def expire_apply_timeouts(
    session: AsyncSession,
    *,
    rollout_id: int,
    now: datetime,
    apply_seconds: int,
    batch_size: int = SWEEP_BATCH,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Targets notified or updating for longer than `apply_seconds` (since `notified_at`, by
    `now`) become failed with APPLY_TIMEOUT: the next `batch_size` of them after
    `after_vehicle_id` (a keyset pass over the rollout's primary key)."""
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
                """
                WITH todo AS (
                    SELECT t.vehicle_id, t.state AS old_state
                    FROM rollout_targets t
                    WHERE t.rollout_id = :rid AND t.vehicle_id > :after
                      AND t.state IN ('notified', 'updating')
                      AND t.notified_at <= CAST(:now AS timestamptz)
                                           - make_interval(secs => :apply)
                    ORDER BY t.vehicle_id
                    LIMIT :n
                    FOR UPDATE OF t
                ),
                moved AS (
                    UPDATE rollout_targets t
                    SET state = 'failed', reason_code = 'APPLY_TIMEOUT', updated_at = :now
                    FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
                    RETURNING todo.old_state, t.state AS new_state
                ),
                """
                + _COUNTER_DELTAS_KEYSET
            ),
            {
                "rid": rollout_id,
                "now": now,
                "apply": apply_seconds,
                "n": batch_size,
                "after": after_vehicle_id,
            },
        )
    ).one()
    return _sweep_batch(row, batch_size, after_vehicle_id)


async def retry_failed_targets(
    session: AsyncSession,
    *,
    rollout_id: int,
    release_version: str,
    now: datetime,
    max_attempts: int,
    backoff_seconds: int,
    batch_size: int = SWEEP_BATCH,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Re-issue the desired state to targets that failed for a retryable reason, with
    attempts left, once their backoff (`policy.retry_backoff_seconds`, from the failure's
    `updated_at`) is over by `now`; the next `batch_size` after `after_vehicle_id`.

    Declarative and idempotent: a NEW desired state per attempt (a target set: every vehicle
    on its k-th attempt points to the one whose id derives from the workflow id and k), the
    target back to `notified` (attempt + 1, apply clock restarted at `now`). A vehicle whose
    desired state is no longer this rollout's (another rollout or an operator moved it) is not
    retried.
    """
    created_by = rollout_workflow_id(rollout_id)
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
                """
                WITH todo AS MATERIALIZED (
                    SELECT t.vehicle_id, t.state AS old_state, t.attempt + 1 AS attempt,
                           md5(CAST(:created_by AS text) || ':retry:'
                               || (t.attempt + 1)::text)::uuid AS ds_id
                    FROM rollout_targets t
                    JOIN vehicles v ON v.id = t.vehicle_id
                    WHERE t.rollout_id = :rid AND t.vehicle_id > :after
                      AND t.state = 'failed'
                      AND t.reason_code = ANY(CAST(:retryable AS text[]))
                      AND t.attempt < :max
                      AND v.desired_state_id IS NOT DISTINCT FROM t.desired_state_id
                      AND t.updated_at <= CAST(:now AS timestamptz) - make_interval(
                          secs => least(greatest(:base, :cap),
                                        :base * power(2, greatest(t.attempt - 1, 0))))
                    ORDER BY t.vehicle_id
                    LIMIT :n
                    FOR UPDATE OF t
                ),
                ins AS (
                    INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                                reason, created_by)
                    SELECT DISTINCT ds_id, NULL::text, :release, :rid,
                           'retry ' || attempt::text || ' of rollout ' || CAST(:rid AS text),
                           :created_by
                    FROM todo
                    ON CONFLICT (id) DO NOTHING
                ),
                upv AS (
                    UPDATE vehicles v
                    SET desired_state_id = todo.ds_id, desired_release_version = :release,
                        status = CASE WHEN v.status = 'offline' THEN v.status
                                      ELSE 'pending' END,
                        updated_at = now()
                    FROM todo WHERE v.id = todo.vehicle_id
                ),
                moved AS (
                    UPDATE rollout_targets t
                    SET state = 'notified', attempt = todo.attempt, reason_code = NULL,
                        desired_state_id = todo.ds_id, notified_at = :now, updated_at = :now
                    FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
                    RETURNING todo.old_state, t.state AS new_state
                ),
                """
                + _COUNTER_DELTAS_KEYSET
            ),
            {
                "rid": rollout_id,
                "created_by": created_by,
                "release": release_version,
                "retryable": sorted(RETRYABLE_REASONS),
                "max": max_attempts,
                "now": now,
                "base": backoff_seconds,
                "cap": MAX_BACKOFF_SECONDS,
                "n": batch_size,
                "after": after_vehicle_id,
            },
        )
    ).one()
    return _sweep_batch(row, batch_size, after_vehicle_id)


async def recheck_blocked(
    session: AsyncSession,
    *,
    rollout_id: int,
    now: datetime,
    require_stationary: bool,
    min_battery_percent: int,
    batch_size: int = SWEEP_BATCH,
    after_vehicle_id: str = "",
) -> SweepBatch:
    """Blocked targets whose vehicle's latest heartbeat (after the block) passes the safety
    checks again (battery >= min, stationary when required) go back to `notified`, their
    apply clock restarted at `now`; the next `batch_size` after `after_vehicle_id`.

    The vehicle still holds this rollout's desired state (a block is not a failure and uses no
    attempt): it proceeds on its next poll; its status returns from blocked to pending.
    """
    conn = await _conn(session)
    row = (
        await conn.execute(
            text(
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
                upv AS (
                    UPDATE vehicles v SET status = 'pending', updated_at = now()
                    FROM todo WHERE v.id = todo.vehicle_id AND v.status = 'blocked'
                ),
                moved AS (
                    UPDATE rollout_targets t
                    SET state = 'notified', reason_code = NULL, notified_at = :now,
                        updated_at = :now
                    FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
                    RETURNING todo.old_state, t.state AS new_state
                ),
                """
                + _COUNTER_DELTAS_KEYSET
            ),
            {
                "rid": rollout_id,
                "now": now,
                "min_battery": min_battery_percent,
                "stationary": require_stationary,
                "n": batch_size,
                "after": after_vehicle_id,
            },
        )
    ).one()
    return _sweep_batch(row, batch_size, after_vehicle_id)
