"""Rollout queries: create (validation, safety policy, audit), list and get, within scope."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import func, literal
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.temporal import rollout_workflow_id
from models.api import RolloutCreate
from models.enums import AuditSource, RolloutStatus
from models.scope import Scope
from models.tables import Release, Rollout
from services import audit, change_feed
from services.errors import InvalidInput, NotFoundError, OutOfScope, SafetyWeakened
from services.pagination import SortKey, any_of, keyset, parse_sort, split_page, timestamp_key
from services.safety import SafetyDefaults, effective_safety

ROLLOUT_SORTS = (
    SortKey("id", col(Rollout.id)),
    timestamp_key("createdAt", col(Rollout.created_at)),
    SortKey("status", col(Rollout.status)),
)
SCOPE_DIMENSIONS = (("regions", "regions"), ("models", "models"), ("orgs", "orgs"))


@dataclass(frozen=True)
class Actor:
    """Who performs a write, for the audit log."""

    subject: str
    role: str | None
    source: AuditSource
    correlation_id: str | None = None


class AuditScope(TypedDict):
    regions: list[str] | None
    models: list[str] | None
    orgs: list[str] | None


def audit_scope(targets: dict[str, Any]) -> AuditScope:
    """The scope an audit entry about a rollout carries: its targets' regions, models, orgs."""
    return AuditScope(
        regions=list(targets.get("regions") or []) or None,
        models=list(targets.get("models") or []) or None,
        orgs=list(targets.get("orgs") or []) or None,
    )


def _scope_problems(targets: dict[str, Any], scope: Scope) -> list[str]:
    problems = []
    for dimension, attr in SCOPE_DIMENSIONS:
        allowed = getattr(scope, attr)
        if allowed is None:
            continue
        chosen = targets.get(dimension) or []
        if dimension == "orgs":
            # Targets do not select by org: an org-scoped caller's rollouts carry its orgs.
            continue
        if not chosen or not set(chosen) <= set(allowed):
            problems.append(dimension)
    return problems


def in_scope_condition(scope: Scope):  # type: ignore[no-untyped-def]
    """SQL: the rollout's targets stay inside the caller's scope on every scoped dimension."""
    conds = []
    for dimension, attr in SCOPE_DIMENSIONS:
        allowed = getattr(scope, attr)
        if allowed is None:
            continue
        selected = col(Rollout.targets)[dimension]
        conds.append(func.jsonb_array_length(func.coalesce(selected, literal([], JSONB))) > 0)
        conds.append(selected.op("<@")(literal(list(allowed), JSONB)))
    return conds


async def create_rollout(
    session: AsyncSession,
    *,
    body: RolloutCreate,
    actor: Actor,
    scope: Scope,
    safety_defaults: SafetyDefaults,
) -> Rollout:
    release = await session.get(Release, body.release_version)
    if release is None:
        raise InvalidInput(
            f"release {body.release_version!r} does not exist",
            details=[{"field": "releaseVersion", "message": "register the release first"}],
        )
    targets = body.targets.model_dump(by_alias=True)
    if scope.orgs is not None:
        targets["orgs"] = list(scope.orgs)
    outside = _scope_problems(targets, scope)
    if outside:
        raise OutOfScope(
            "the targets reach outside your scope",
            details=[
                {"field": f"targets.{d}", "message": "must stay inside your scope"} for d in outside
            ],
        )
    checks = body.gates.safety_checks
    safety = effective_safety(
        defaults=safety_defaults,
        require_stationary=checks.require_stationary,
        min_battery_percent=checks.min_battery_percent,
    )
    acknowledgement = None
    if safety.weakened:
        if not (body.acknowledge_weakened_safety and (body.reason or "").strip()):
            raise SafetyWeakened(
                "the safety checks are weaker than the fleet default; set "
                "acknowledgeWeakenedSafety to true and give a reason",
                details=[
                    {"field": f"gates.safetyChecks.{name}", "message": "weaker than default"}
                    for name in safety.weakened
                ],
            )
        acknowledgement = {
            "weakened": list(safety.weakened),
            "reason": body.reason,
            "by": actor.subject,
            "at": datetime.now(UTC).isoformat(),
        }
    gates = body.gates.model_dump(by_alias=True)
    gates["safetyChecks"]["requireStationary"] = safety.require_stationary
    gates["safetyChecks"]["minBatteryPercent"] = safety.min_battery_percent

    rollout = Rollout(
        name=body.name,
        release_version=body.release_version,
        targets=targets,
        strategy=body.strategy.model_dump(by_alias=True),
        gates=gates,
        timeouts=body.timeouts.model_dump(by_alias=True),
        retry=body.retry.model_dump(by_alias=True),
        status=RolloutStatus.PENDING.value,
        safety_acknowledgement=acknowledgement,
        correlation_id=actor.correlation_id,
        created_by=actor.subject,
    )
    session.add(rollout)
    await session.flush()
    assert rollout.id is not None
    rollout.workflow_id = rollout_workflow_id(rollout.id)
    entries = [("rollout.created", body.model_dump(by_alias=True, mode="json"))]
    if acknowledgement:
        entries.append(("rollout.safety_weakened", acknowledgement))
    for action, payload in entries:
        await audit.record(
            session,
            actor=actor.subject,
            role=actor.role,
            source=actor.source,
            action=action,
            target_type="rollout",
            target_id=str(rollout.id),
            reason=body.reason,
            correlation_id=actor.correlation_id,
            payload=payload,
            **audit_scope(targets),
        )
    await change_feed.publish(
        session,
        topic="rollouts",
        event="rollout.updated",
        entity_id=str(rollout.id),
        payload={"id": rollout.id, "status": rollout.status, "stage": None},
    )
    return rollout


async def mark_start_failed(session: AsyncSession, *, rollout_id: int, actor: Actor) -> None:
    rollout = await session.get(Rollout, rollout_id)
    if rollout is None:
        return
    rollout.status = RolloutStatus.FAILED.value
    rollout.status_reason = "WORKFLOW_START_FAILED"
    rollout.finished_at = datetime.now(UTC)
    rollout.updated_at = rollout.finished_at
    await audit.record(
        session,
        actor=actor.subject,
        role=actor.role,
        source=AuditSource.SYSTEM,
        action="rollout.start_failed",
        target_type="rollout",
        target_id=str(rollout_id),
        correlation_id=actor.correlation_id,
        result="error",
    )


async def list_rollouts(
    session: AsyncSession,
    *,
    scope: Scope,
    statuses: list[str],
    release_versions: list[str],
    sort: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Rollout], str | None]:
    allowed = {s.value for s in RolloutStatus}
    for status in statuses:
        if status not in allowed:
            raise InvalidInput(
                f"unknown status {status!r}",
                details=[{"field": "status", "message": f"one of {sorted(allowed)}"}],
            )
    order = parse_sort(sort, ROLLOUT_SORTS, "-id")
    stmt = select(Rollout).where(*in_scope_condition(scope))
    for column, values in (
        (col(Rollout.status), statuses),
        (col(Rollout.release_version), release_versions),
    ):
        cond = any_of(column, values)
        if cond is not None:
            stmt = stmt.where(cond)
    stmt = keyset(stmt, sort=order, id_column=col(Rollout.id), cursor=cursor, limit=limit)
    rows = list((await session.exec(stmt)).all())
    attr = {"id": "id", "createdAt": "created_at", "status": "status"}[order.key.name]
    return split_page(
        rows, sort=order, limit=limit, value_of=lambda r: getattr(r, attr), id_of=lambda r: r.id
    )


async def get_rollout(session: AsyncSession, *, scope: Scope, rollout_id: int) -> Rollout:
    stmt = select(Rollout).where(col(Rollout.id) == rollout_id, *in_scope_condition(scope))
    rollout = (await session.exec(stmt)).first()
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    return rollout
