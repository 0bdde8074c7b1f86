"""Direct desired states: an operator sets the release a target set of vehicles should run,
outside any rollout. The same rules as a rollout apply: the release exists and verifies, the
targets stay inside the caller's scope, the safety policy is not weaker than the fleet
default unless acknowledged with a reason, and no vehicle inside an active rollout is taken
(see docs/rollouts.md, "Overlap"). Set-based: one statement writes every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, literal, or_, text, tuple_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import InvalidInput
from models.api import DesiredStateCreate, DesiredStatesCreated, IssuedDesiredState
from models.scope import Scope
from models.tables import DesiredState, Rollout, Vehicle
from services import change_feed
from services.assignment import (
    AssignmentRequest,
    check_assignment,
    find_overlap,
    lock_fleet_assignment,
    overlap_conflict,
)
from services.audit import record_write
from services.pagination import (
    Sort,
    check_rollout_ids,
    decode_cursor,
    split_page,
    timestamp_key,
    where_any_of,
)
from services.safety import desired_state_constraints
from services.scope import (
    rollouts_in_scope,
    vehicle_scope_sql,
    vehicles_in_scope,
)
from services.targets import REQUEST_MATCH, match_params

# Above this, a direct desired state is refused: a rollout stages, gates and can roll back.
MAX_DIRECT_VEHICLES = 10_000
SAMPLE = 10

DESIRED_STATE_SORT = Sort(timestamp_key("createdAt", col(DesiredState.created_at)), True)


@dataclass(frozen=True)
class DesiredStateFilters:
    vehicle_ids: list[str]
    rollout_ids: list[str]
    release_versions: list[str]

    def validate(self) -> None:
        check_rollout_ids(self.rollout_ids)


def desired_state_list_statement(
    *, scope: Scope, filters: DesiredStateFilters, cursor: str | None, limit: int
) -> Any:
    """The statement of one page of `list_desired_states` (bench/api_reads.py shows its plan
    at a million vehicles)."""
    filters.validate()
    stmt = select(DesiredState)
    if not scope.unrestricted:
        stmt = stmt.where(
            or_(
                # A correlated EXISTS, probed by the vehicles' primary key for each desired
                # state read (newest first, until the page is full). OFFSET 0 keeps PostgreSQL
                # from turning it into a hash of every vehicle in the scope (677 ms against
                # 6 ms at a million vehicles: bench/api_reads.py prints the plan).
                exists(
                    vehicles_in_scope(
                        select(literal(1)).where(col(Vehicle.id) == col(DesiredState.vehicle_id)),
                        scope,
                    ).offset(0)
                ),
                and_(
                    col(DesiredState.vehicle_id).is_(None),
                    col(DesiredState.rollout_id).in_(
                        select(col(Rollout.id)).where(*rollouts_in_scope(scope))
                    ),
                ),
            )
        )
    if filters.vehicle_ids:
        stmt = stmt.where(
            or_(
                col(DesiredState.vehicle_id).in_(filters.vehicle_ids),
                col(DesiredState.id).in_(
                    select(col(Vehicle.desired_state_id)).where(
                        col(Vehicle.id).in_(filters.vehicle_ids)
                    )
                ),
            )
        )
    stmt = where_any_of(
        stmt,
        (col(DesiredState.rollout_id), [int(r) for r in filters.rollout_ids]),
        (col(DesiredState.release_version), filters.release_versions),
    )
    if filters.rollout_ids and not scope.unrestricted:  # a rollout outside selects nothing
        stmt = stmt.where(
            col(DesiredState.rollout_id).in_(
                select(col(Rollout.id)).where(*rollouts_in_scope(scope))
            )
        )
    if cursor:
        at, after_id = decode_cursor(cursor, DESIRED_STATE_SORT, id_kind="uuid")
        stmt = stmt.where(
            tuple_(col(DesiredState.created_at), col(DesiredState.id)) < tuple_(at, after_id)
        )
    stmt = stmt.order_by(col(DesiredState.created_at).desc(), col(DesiredState.id).desc())
    return stmt.limit(limit + 1)


async def list_desired_states(
    session: AsyncSession,
    *,
    scope: Scope,
    filters: DesiredStateFilters,
    cursor: str | None,
    limit: int,
) -> tuple[list[DesiredState], str | None]:
    """Newest first, keyset on (created_at, id); only what is inside the caller's scope (a
    vehicle's desired state: the vehicle; a target set's: its rollout). `vehicleId` matches
    the desired states addressed to the vehicle and the target-set one it now points to."""
    stmt = desired_state_list_statement(scope=scope, filters=filters, cursor=cursor, limit=limit)
    rows = list((await session.exec(stmt)).all())
    ids = {d.rollout_id for d in rows if d.rollout_id is not None}
    if ids and not scope.unrestricted:
        # A vehicle's desired state may come from a rollout that also reaches outside the
        # caller's scope: that rollout's id is not shown (the row is kept, detached from the
        # session so the change is never written).
        seen = await session.exec(
            select(col(Rollout.id)).where(col(Rollout.id).in_(ids), *rollouts_in_scope(scope))
        )
        visible = set(seen.all())
        for d in rows:
            if d.rollout_id is not None and d.rollout_id not in visible:
                session.expunge(d)
                d.rollout_id = None
    return split_page(
        rows,
        sort=DESIRED_STATE_SORT,
        limit=limit,
        value_of=lambda d: d.created_at,
        id_of=lambda d: str(d.id),
    )


def _matching(targets: dict[str, Any], scope: Scope) -> tuple[str, dict[str, Any]]:
    """The condition on `vehicles v` selecting what `targets` select inside `scope`, and its
    parameters."""
    inside, params = vehicle_scope_sql(scope, "v")
    return f"{REQUEST_MATCH}{inside}", {**match_params(targets), **params}


async def _matching_count(session: AsyncSession, *, targets: dict[str, Any], scope: Scope) -> int:
    where, params = _matching(targets, scope)
    conn = await session.connection()
    result = await conn.execute(text(f"SELECT count(*) FROM vehicles v WHERE {where}"), params)
    return int(result.scalar_one())


# The vehicles issued a desired state (`issued`), as change-feed deltas.
_ISSUED_DELTAS = change_feed.vehicle_deltas_sql(
    "issued",
    "'status', s.status, 'desired', jsonb_build_object('releaseVersion',"
    " CAST(:release AS text), 'desiredStateId', s.desired_state_id::text, 'rolloutId', NULL)",
)


def _issue_statement(where: str) -> str:
    """One desired state per vehicle matching `where` (its previous one linked, its
    `constraints` the effective safety checks), the vehicle pointed to it, `pending`
    (`offline` stays), and the deltas on the change feed."""
    return f"""
        WITH todo AS (
            SELECT v.id AS vehicle_id, v.desired_state_id AS previous_desired_state_id,
                   gen_random_uuid() AS desired_state_id
            FROM vehicles v
            WHERE {where}
            ORDER BY v.id
            FOR UPDATE OF v
        ),
        desired_states_written AS (
            INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,
                                        previous_desired_state_id, reason, created_by,
                                        constraints)
            SELECT desired_state_id, vehicle_id, :release, NULL, previous_desired_state_id,
                   :reason, :created_by, CAST(:constraints AS jsonb)
            FROM todo
        ),
        issued AS (
            UPDATE vehicles v
            SET desired_release_version = :release,
                desired_state_id = todo.desired_state_id,
                rollout_id = NULL,
                status = CASE WHEN v.status = 'offline' THEN v.status ELSE 'pending' END,
                updated_at = now()
            FROM todo WHERE v.id = todo.vehicle_id
            RETURNING v.id, v.status, v.region, v.model, v.org, todo.desired_state_id
        ),
        feed AS ({_ISSUED_DELTAS})
        SELECT id, desired_state_id FROM issued ORDER BY id
    """


async def _check_selection(
    session: AsyncSession, *, targets: dict[str, Any], scope: Scope, max_vehicles: int
) -> None:
    """Under the fleet-assignment lock: the targets select at least one vehicle, at most
    `max_vehicles`, and none inside an active rollout."""
    await lock_fleet_assignment(session)
    count = await _matching_count(session, targets=targets, scope=scope)
    if count == 0:
        raise InvalidInput(
            "the targets select no vehicle",
            details=[{"field": "targets", "message": "no vehicle matches"}],
        )
    if count > max_vehicles:
        raise InvalidInput(
            f"the targets select {count} vehicles; a direct desired state may set at most "
            f"{max_vehicles}: use a rollout (POST /api/v1/rollouts), which stages and gates",
            details=[{"field": "targets", "message": f"at most {max_vehicles} vehicles"}],
        )
    overlap = await find_overlap(session, targets=targets, scope=scope)
    if overlap.vehicles:
        raise overlap_conflict(overlap, what="this desired state")


async def create_desired_states(
    session: AsyncSession,
    *,
    body: DesiredStateCreate,
    request: AssignmentRequest,
    max_vehicles: int = MAX_DIRECT_VEHICLES,
) -> DesiredStatesCreated:
    """One `desired_states` row per matching vehicle (its previous desired state linked), the
    vehicles' desired release set and their status `pending` (`offline` stays), their deltas in
    `vehicle.updated` change-feed rows (up to `VEHICLE_DELTAS_PER_ROW` vehicles each) and one
    audit entry, in the caller's transaction."""
    checked = await check_assignment(
        session,
        request=request,
        release_version=body.release_version,
        targets=body.targets,
        safety_checks=body.safety_checks,
        acknowledged=body.acknowledge_weakened_safety,
        reason=body.reason,
        safety_field="safetyChecks",
    )
    targets, scope, actor = checked.targets, request.scope, request.actor
    await _check_selection(session, targets=targets, scope=scope, max_vehicles=max_vehicles)
    safety_checks = checked.effective_checks(
        body.safety_checks.model_dump(by_alias=True, mode="json")
    )
    where, params = _matching(targets, scope)
    conn = await session.connection()
    issued = await conn.execute(
        text(_issue_statement(where)),
        {
            **params,
            "release": checked.release.version,
            "reason": body.reason,
            "created_by": actor.subject,
            "constraints": json.dumps(
                desired_state_constraints(
                    min_battery_percent=checked.safety.min_battery_percent,
                    require_stationary=checked.safety.require_stationary,
                    window=safety_checks.get("maintenanceWindow"),
                )
            ),
        },
    )
    rows = issued.all()
    sample = [
        IssuedDesiredState(vehicle_id=r.id, desired_state_id=str(r.desired_state_id))
        for r in rows[:SAMPLE]
    ]
    await record_write(
        session,
        actor=actor,
        action="desired_states.created",
        target_type="release",
        target_id=checked.release.version,
        reason=body.reason,
        payload={
            **body.model_dump(by_alias=True, mode="json"),
            "count": len(rows),
            "effectiveSafetyChecks": safety_checks,
            "sample": [s.model_dump(by_alias=True) for s in sample],
        },
        acknowledgement=checked.acknowledgement,
        targets=targets,
    )
    return DesiredStatesCreated(
        release_version=checked.release.version,
        count=len(rows),
        sample=sample,
        safety_checks=safety_checks,
    )
