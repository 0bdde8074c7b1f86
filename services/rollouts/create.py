"""Creating a rollout: the checks create and the dry run share (release and signature, scope,
safety policy), the dry run's plan, and the stored rollout with its audit entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.api import PlannedStage, RolloutCreate, RolloutPlanOut, SafetyNow
from models.enums import RolloutStatus
from models.tables import Rollout
from models.workflows import StagePlan
from services.assignment import (
    AssignmentRequest,
    CheckedAssignment,
    check_assignment,
    find_overlap,
    lock_fleet_assignment,
    overlap_conflict,
)
from services.audit import record_write
from services.rollouts.status import WAITING_FOR_START, publish_rollout, snapshot_of
from services.safety import EffectiveSafety
from services.targets import REQUEST_MATCH, match_params
from workflows.policy import plan_from_strategy


async def safety_now(
    session: AsyncSession, *, targets: dict[str, Any], safety: EffectiveSafety
) -> tuple[int, SafetyNow]:
    """How many vehicles `targets` select, and how many the safety checks would block now."""
    conn = await session.connection()
    row = (
        await conn.execute(
            text(
                f"""
                SELECT count(*) AS targeted,
                       count(*) FILTER (WHERE v.battery_percent < :min_battery) AS battery_low,
                       count(*) FILTER (WHERE :stationary AND v.stationary IS FALSE)
                           AS not_stationary,
                       count(*) FILTER (WHERE v.battery_percent < :min_battery
                                          OR (:stationary AND v.stationary IS FALSE))
                           AS blocked,
                       count(*) FILTER (WHERE v.battery_percent IS NULL
                                          OR (:stationary AND v.stationary IS NULL)) AS unknown,
                       count(*) FILTER (WHERE v.status = 'offline') AS offline
                FROM vehicles v WHERE {REQUEST_MATCH}
                """
            ),
            {
                **match_params(targets),
                "min_battery": safety.min_battery_percent,
                "stationary": safety.require_stationary,
            },
        )
    ).one()
    return int(row.targeted), SafetyNow(
        require_stationary=safety.require_stationary,
        min_battery_percent=safety.min_battery_percent,
        blocked=int(row.blocked),
        battery_low=int(row.battery_low),
        not_stationary=int(row.not_stationary),
        unknown=int(row.unknown),
        offline=int(row.offline),
    )


@dataclass(frozen=True)
class ValidatedRollout:
    checked: CheckedAssignment
    gates: dict[str, Any]  # as stored: the effective safety checks filled in


async def validate_rollout(
    session: AsyncSession,
    *,
    body: RolloutCreate,
    request: AssignmentRequest,
    refuse_weakened: bool = True,
) -> ValidatedRollout:
    """Everything create checks before it writes (`assignment.check_assignment`)."""
    checked = await check_assignment(
        session,
        request=request,
        release_version=body.release_version,
        targets=body.targets,
        safety_checks=body.gates.safety_checks,
        acknowledged=body.acknowledge_weakened_safety,
        reason=body.reason,
        safety_field="gates.safetyChecks",
        refuse_weakened=refuse_weakened,
    )
    gates = body.gates.model_dump(by_alias=True)
    checked.effective_checks(gates["safetyChecks"])
    return ValidatedRollout(checked, gates)


async def plan_rollout_request(
    session: AsyncSession, *, body: RolloutCreate, request: AssignmentRequest
) -> RolloutPlanOut:
    """The dry run: validate like create (a bad release, signature or scope is refused the
    same way), then plan without writing anything. An unacknowledged weakening and an
    overlap are reported (`canStart: false`, `problems`) rather than refused, so the
    operator sees the whole picture in one answer."""
    v = await validate_rollout(session, body=body, request=request, refuse_weakened=False)
    checked = v.checked
    targeted, blocked = await safety_now(session, targets=checked.targets, safety=checked.safety)
    stages: list[StagePlan] = plan_from_strategy(targeted, body.strategy.model_dump(by_alias=True))
    overlap = await find_overlap(session, targets=checked.targets, scope=request.scope)
    unacknowledged = bool(checked.safety.weakened) and checked.acknowledgement is None
    problems = []
    if unacknowledged:
        problems.append(
            "SAFETY_POLICY_WEAKENED: " + ", ".join(checked.safety.weakened) + " weaker than default"
        )
    if overlap.vehicles:
        problems.append(f"CONFLICT: {overlap.vehicles} vehicle(s) inside another active rollout")
    if targeted == 0:
        problems.append("NO_VEHICLES: the targets select no vehicle")
    return RolloutPlanOut(
        release_version=checked.release.version,
        targeted=targeted,
        stages=planned_stages(stages),
        safety=blocked,
        weakened_safety=list(checked.safety.weakened),
        maintenance_window=v.gates["safetyChecks"].get("maintenanceWindow"),
        overlap=overlap,
        can_start=not (overlap.vehicles or unacknowledged),
        problems=problems,
    )


def planned_stages(stages: list[StagePlan]) -> list[PlannedStage]:
    """The stages as the API shows them (a dry run's plan, a rollout's `stages`)."""
    return [
        PlannedStage(index=s.index, name=s.name, vehicles=s.size, bake_seconds=s.bake_seconds)
        for s in stages
    ]


def rollout_stages(targeted: int, strategy: dict[str, Any] | None) -> list[PlannedStage]:
    """A rollout's stages as planned from its targeted count and stored strategy; none when
    the stored strategy no longer plans (shown as stored, not checked)."""
    try:
        return planned_stages(plan_from_strategy(targeted, strategy or {}))
    except (AttributeError, KeyError, TypeError, ValueError):
        return []


async def create_rollout(
    session: AsyncSession, *, body: RolloutCreate, request: AssignmentRequest
) -> Rollout:
    """Store a pending rollout (its workflow is started by the caller once this commits),
    audited as `rollout.created`; refused when a targeted vehicle is inside another active
    rollout."""
    v = await validate_rollout(session, body=body, request=request)
    targets, actor = v.checked.targets, request.actor
    await lock_fleet_assignment(session)
    overlap = await find_overlap(session, targets=targets, scope=request.scope)
    if overlap.vehicles:
        raise overlap_conflict(overlap, what="this rollout")
    rollout = Rollout(
        name=body.name,
        release_version=body.release_version,
        targets=targets,
        strategy=body.strategy.model_dump(by_alias=True),
        gates=v.gates,
        timeouts=body.timeouts.model_dump(by_alias=True),
        retry=body.retry.model_dump(by_alias=True),
        status=RolloutStatus.PENDING.value,
        waiting_for=WAITING_FOR_START,
        safety_acknowledgement=v.checked.acknowledgement,
        correlation_id=actor.correlation_id,
        created_by=actor.subject,
    )
    session.add(rollout)
    await session.flush()
    assert rollout.id is not None
    rollout.workflow_id = rollout_workflow_id(rollout.id)
    await record_write(
        session,
        actor=actor,
        action="rollout.created",
        target_type="rollout",
        target_id=str(rollout.id),
        reason=body.reason,
        payload=body.model_dump(by_alias=True, mode="json"),
        acknowledgement=v.checked.acknowledgement,
        targets=targets,
    )
    # The same fields as every later update, from the row just written (no read back).
    await publish_rollout(
        session, rollout_id=rollout.id, snapshot=snapshot_of(rollout.model_dump())
    )
    return rollout
