"""Which rollout holds a vehicle: a vehicle is *inside* an active rollout while that rollout
is not finished and either its target row there is not finished, or the rollout has not
expanded its targets yet and its stored targets select the vehicle (docs/rollouts.md,
"Overlap"). A rollout or a direct desired state that would take a vehicle inside another
active rollout is refused (409); writers that assign vehicles take one lock first, so two
concurrent requests cannot both pass the check.

Both writers first pass the same checks (`check_assignment`): the release exists and its
signature verifies, the targets stay inside the caller's scope, the safety policy is not
weaker than the fleet default unless acknowledged with a reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import Conflict
from models.api import Overlap, RolloutTargets, SafetyChecks
from models.enums import TERMINAL_ROLLOUT_STATUSES, RolloutStatus, TargetState
from models.scope import Scope
from models.tables import Release, Rollout
from services.audit import Actor
from services.releases import load_verified_release
from services.safety import EffectiveSafety, SafetyDefaults, resolve_safety
from services.scope import check_targets_in_scope, rollouts_in_scope, vehicle_scope_sql
from services.signing import TrustedKeys
from services.targets import REQUEST_MATCH, match_params, stored_array_match, stored_arrays


@dataclass(frozen=True)
class AssignmentRequest:
    """Who asks to assign vehicles a release, and the fleet's settings that judge it."""

    actor: Actor
    scope: Scope
    safety_defaults: SafetyDefaults
    trusted_keys: TrustedKeys | None


@dataclass(frozen=True)
class CheckedAssignment:
    release: Release
    targets: dict[str, Any]
    safety: EffectiveSafety
    acknowledgement: dict[str, Any] | None  # the weakened safety to audit, when acknowledged

    def effective_checks(self, checks: dict[str, Any]) -> dict[str, Any]:
        """`checks` (camelCase, as stored) with the effective safety filled in."""
        checks["requireStationary"] = self.safety.require_stationary
        checks["minBatteryPercent"] = self.safety.min_battery_percent
        return checks


async def check_assignment(
    session: AsyncSession,
    *,
    request: AssignmentRequest,
    release_version: str,
    targets: RolloutTargets,
    safety_checks: SafetyChecks,
    acknowledged: bool,
    reason: str | None,
    safety_field: str,
    refuse_weakened: bool = True,
) -> CheckedAssignment:
    """The checks every writer of assignments passes before it writes: the release exists and
    verifies, the targets are inside the scope (an org-scoped caller's own orgs filled in),
    the safety policy resolved (refused when weakened without acknowledgement, unless
    `refuse_weakened` is False: the dry run reports it instead)."""
    release = await load_verified_release(
        session, version=release_version, trusted_keys=request.trusted_keys
    )
    chosen = targets.model_dump(by_alias=True)
    check_targets_in_scope(chosen, request.scope)
    safety, acknowledgement = resolve_safety(
        checks=safety_checks,
        defaults=request.safety_defaults,
        acknowledged=acknowledged,
        reason=reason,
        actor=request.actor,
        field_prefix=safety_field,
        refuse=refuse_weakened,
    )
    return CheckedAssignment(release, chosen, safety, acknowledgement)


# A rollout in one of these statuses holds its vehicles (see docs/rollouts.md, "Overlap").
ACTIVE_ROLLOUT_STATUSES = tuple(
    s.value for s in RolloutStatus if s not in TERMINAL_ROLLOUT_STATUSES
)

# A vehicle whose target row is in one of these states is still inside its rollout.
HOLDING_TARGET_STATES = tuple(
    s.value
    for s in (
        TargetState.PLANNED,
        TargetState.NOTIFIED,
        TargetState.UPDATING,
        TargetState.BLOCKED,
        TargetState.FAILED,
    )
)

OVERLAP_SAMPLE = 10

# One fleet-assignment writer at a time (rollout creation, direct desired states), so two
# concurrent requests cannot both pass the overlap check for the same vehicles.
FLEET_ASSIGNMENT_LOCK = 0x6D6F746F72636164  # "motorcad"


async def lock_fleet_assignment(session: AsyncSession) -> None:
    """Serialize writers that assign vehicles (held until the transaction ends)."""
    conn = await session.connection()
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": FLEET_ASSIGNMENT_LOCK})


async def find_overlap(
    session: AsyncSession,
    *,
    targets: dict[str, Any],
    scope: Scope,
    exclude_rollout_id: int | None = None,
) -> Overlap:
    """Vehicles selected by `targets` (inside `scope`) that are already inside another active
    rollout: one whose status is not terminal and that holds them (a target row not yet
    finished, or, before its expansion, a match of its stored targets). Only the rollouts the
    caller can see (`services.scope`) are named: a scoped caller learns that some of its own
    vehicles are held, never the id or the number of rollouts outside its scope."""
    conn = await session.connection()
    in_scope, scope_params = vehicle_scope_sql(scope, "v")
    row = (
        await conn.execute(
            text(
                f"""
                WITH active AS MATERIALIZED (
                    SELECT r.id, r.stage_count,
                           {stored_arrays()}
                    FROM rollouts r
                    WHERE r.status = ANY(CAST(:active AS text[])) AND r.id <> :exclude
                ),
                held AS MATERIALIZED (
                    SELECT v.id AS vehicle_id, a.id AS rollout_id
                    FROM active a
                    JOIN rollout_targets t ON t.rollout_id = a.id
                    JOIN vehicles v ON v.id = t.vehicle_id
                    WHERE a.stage_count > 0 AND t.state = ANY(CAST(:holding AS text[]))
                      AND {REQUEST_MATCH}{in_scope}
                    UNION ALL
                    SELECT v.id, a.id
                    FROM active a
                    JOIN vehicles v ON {stored_array_match()}
                    WHERE a.stage_count = 0 AND {REQUEST_MATCH}{in_scope}
                )
                SELECT (SELECT count(*) FROM (SELECT DISTINCT vehicle_id FROM held) vehicles)
                           AS vehicles,
                       ARRAY(SELECT DISTINCT vehicle_id FROM held
                             ORDER BY vehicle_id LIMIT {OVERLAP_SAMPLE}) AS sample,
                       ARRAY(SELECT DISTINCT rollout_id FROM held ORDER BY rollout_id)
                           AS rollouts
                """
            ),
            {
                **match_params(targets),
                **scope_params,
                "holding": list(HOLDING_TARGET_STATES),
                "active": list(ACTIVE_ROLLOUT_STATUSES),
                "exclude": exclude_rollout_id or 0,
            },
        )
    ).one()
    rollout_ids = [int(r) for r in row.rollouts or []]
    if rollout_ids and not scope.unrestricted:
        visible = await session.exec(
            select(Rollout.id).where(col(Rollout.id).in_(rollout_ids), *rollouts_in_scope(scope))
        )
        shown = set(visible.all())
        rollout_ids = [r for r in rollout_ids if r in shown]
    return Overlap(
        vehicles=int(row.vehicles),
        sample_vehicle_ids=list(row.sample or []),
        rollout_ids=rollout_ids,
    )


def overlap_conflict(overlap: Overlap, *, what: str) -> Conflict:
    """The 409 of an overlap: how many of the caller's targeted vehicles are held, a sample of
    them, and the holding rollouts the caller can see (`find_overlap`)."""
    named = ", ".join(str(r) for r in overlap.rollout_ids)
    return Conflict(
        f"{overlap.vehicles} targeted vehicle(s) are already inside another active rollout"
        f"{f' (visible to you: {named})' if named else ''}; {what} would take them twice. "
        "Narrow the targets, or wait for (or abort) the other rollout(s)",
        details=[
            {
                "field": "targets",
                "message": f"vehicle {vid} is inside another active rollout",
                "code": "VEHICLE_IN_ACTIVE_ROLLOUT",
            }
            for vid in overlap.sample_vehicle_ids
        ]
        + [
            {
                "field": "targets",
                "message": f"{overlap.vehicles} vehicle(s) inside another active rollout"
                + (f"; visible to you: {overlap.rollout_ids}" if overlap.rollout_ids else ""),
                "code": "OVERLAP_SUMMARY",
            }
        ],
    )
