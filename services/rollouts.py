"""Rollout queries: create (validation, safety policy, audit), list and get, within scope."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    ReleaseSignatureInvalid,
    SafetyPolicyWeakened,
)
from core.temporal import rollout_workflow_id
from models.api import (
    Overlap,
    PlannedStage,
    RolloutCreate,
    RolloutPlanOut,
    SafetyChecks,
    SafetyNow,
)
from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus, TargetState
from models.scope import Scope
from models.tables import Release, Rollout, RolloutTarget, Vehicle
from models.workflows import StagePlan
from services import audit, change_feed
from services.pagination import (
    Sort,
    SortKey,
    any_of,
    decode_cursor,
    keyset,
    parse_sort,
    split_page,
    timestamp_key,
)
from services.safety import EffectiveSafety, SafetyDefaults, effective_safety
from services.scope import check_targets_in_scope, rollouts_in_scope, vehicles_in_scope
from services.signing import SignatureInvalid, TrustedKeys, verify_release
from services.targets import REQUEST_MATCH, match_params, stored_array_match, stored_arrays
from workflows.policy import plan_from_strategy

ROLLOUT_SORTS = (
    SortKey("id", col(Rollout.id)),
    timestamp_key("createdAt", col(Rollout.created_at)),
    SortKey("status", col(Rollout.status)),
)

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


# --- validation shared by create, dry run and direct desired states ------------------------

# One fleet-assignment writer at a time (rollout creation, direct desired states), so two
# concurrent requests cannot both pass the overlap check for the same vehicles.
FLEET_ASSIGNMENT_LOCK = 0x6D6F746F72636164  # "motorcad"


async def load_verified_release(
    session: AsyncSession, *, version: str, trusted_keys: TrustedKeys | None
) -> Release:
    """The release, once its stored signature verifies against the trusted keys."""
    release = await session.get(Release, version)
    if release is None:
        raise InvalidInput(
            f"release {version!r} does not exist",
            details=[{"field": "releaseVersion", "message": "register the release first"}],
        )
    check_release_signature(
        trusted_keys,
        version=release.version,
        artifact_digest=release.artifact_digest,
        components=list(release.components or []),
        signature=release.signature,
        key_id=release.signing_key_id,
        field="releaseVersion",
    )
    return release


def check_release_signature(
    trusted_keys: TrustedKeys | None,
    *,
    version: str,
    artifact_digest: str,
    components: list[dict[str, Any]],
    signature: str,
    key_id: str,
    field: str,
) -> None:
    """Return if the release's signature verifies against the artifact registry's trusted
    keys; else `ReleaseSignatureInvalid` (422 RELEASE_SIGNATURE_INVALID) naming `field` and
    why (`no_keys`, `unknown_key`, `malformed`, `mismatch`)."""
    if trusted_keys is None:
        raise ReleaseSignatureInvalid(
            "no trusted release-signing keys are configured (MOTORCADE_TRUSTED_KEYS_FILE); "
            "no release can be verified",
            details=[{"field": field, "message": "no trusted keys", "code": "no_keys"}],
        )
    try:
        verify_release(
            trusted_keys,
            version=version,
            artifact_digest=artifact_digest,
            components=components,
            signature=signature,
            key_id=key_id,
        )
    except SignatureInvalid as exc:
        raise ReleaseSignatureInvalid(
            f"release {version!r} fails signature verification: {exc}",
            details=[{"field": field, "message": str(exc), "code": exc.reason}],
        ) from None


def resolve_safety(
    *,
    checks: SafetyChecks,
    defaults: SafetyDefaults,
    acknowledged: bool,
    reason: str | None,
    actor: Actor,
    field_prefix: str,
    refuse: bool = True,
) -> tuple[EffectiveSafety, dict[str, Any] | None]:
    """The effective safety checks and, when they weaken the fleet default, the
    acknowledgement to audit. Unacknowledged weakening raises `SafetyPolicyWeakened` (unless
    `refuse` is False, for the dry run, which reports it)."""
    safety = effective_safety(
        defaults=defaults,
        require_stationary=checks.require_stationary,
        min_battery_percent=checks.min_battery_percent,
    )
    if not safety.weakened:
        return safety, None
    if not (acknowledged and (reason or "").strip()):
        if not refuse:
            return safety, None
        raise SafetyPolicyWeakened(
            "the safety checks are weaker than the fleet default; set "
            "acknowledgeWeakenedSafety to true and give a reason",
            details=[
                {"field": f"{field_prefix}.{name}", "message": "weaker than default"}
                for name in safety.weakened
            ],
        )
    return safety, {
        "weakened": list(safety.weakened),
        "reason": reason,
        "by": actor.subject,
        "at": datetime.now(UTC).isoformat(),
    }


async def record_write(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    reason: str | None,
    payload: dict[str, Any],
    acknowledgement: dict[str, Any] | None,
    targets: dict[str, Any],
) -> None:
    """The audit entry of a write and, when it weakened the safety policy, the audited
    acknowledgement (`<noun>.safety_weakened`), both scoped like its targets."""
    entries = [(action, payload)]
    if acknowledgement:
        entries.append((action.split(".")[0] + ".safety_weakened", acknowledgement))
    for entry_action, entry_payload in entries:
        await audit.record(
            session,
            actor=actor.subject,
            role=actor.role,
            source=actor.source,
            action=entry_action,
            target_type=target_type,
            target_id=target_id,
            reason=reason,
            correlation_id=actor.correlation_id,
            payload=entry_payload,
            **audit_scope(targets),
        )


async def lock_fleet_assignment(session: AsyncSession) -> None:
    """Serialize writers that assign vehicles (held until the transaction ends)."""
    await session.exec(  # type: ignore[call-overload]
        text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=FLEET_ASSIGNMENT_LOCK)
    )


async def find_overlap(
    session: AsyncSession, *, targets: dict[str, Any], exclude_rollout_id: int | None = None
) -> Overlap:
    """Vehicles selected by `targets` that are already inside another active rollout: one
    whose status is not terminal and that holds them (a target row not yet finished, or,
    before its expansion, a match of its stored targets)."""
    conn = await session.connection()
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
                      AND {REQUEST_MATCH}
                    UNION ALL
                    SELECT v.id, a.id
                    FROM active a
                    JOIN vehicles v ON {stored_array_match()}
                    WHERE a.stage_count = 0 AND {REQUEST_MATCH}
                )
                SELECT (SELECT count(*) FROM (SELECT DISTINCT vehicle_id FROM held) d)
                           AS vehicles,
                       ARRAY(SELECT DISTINCT vehicle_id FROM held
                             ORDER BY vehicle_id LIMIT {OVERLAP_SAMPLE}) AS sample,
                       ARRAY(SELECT DISTINCT rollout_id FROM held ORDER BY rollout_id)
                           AS rollouts
                """
            ),
            {
                **match_params(targets),
                "holding": list(HOLDING_TARGET_STATES),
                "active": list(ACTIVE_ROLLOUT_STATUSES),
                "exclude": exclude_rollout_id or 0,
            },
        )
    ).one()
    return Overlap(
        vehicles=int(row.vehicles),
        sample_vehicle_ids=list(row.sample or []),
        rollout_ids=[int(r) for r in row.rollouts or []],
    )


def overlap_conflict(overlap: Overlap, *, what: str) -> Conflict:
    return Conflict(
        f"{overlap.vehicles} targeted vehicle(s) are already inside active rollout(s) "
        f"{', '.join(str(r) for r in overlap.rollout_ids)}; {what} would take them twice. "
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
                "message": f"{overlap.vehicles} vehicle(s) in rollout(s) {overlap.rollout_ids}",
                "code": "OVERLAP_SUMMARY",
            }
        ],
    )


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
    release: Release
    targets: dict[str, Any]
    gates: dict[str, Any]
    safety: EffectiveSafety
    acknowledgement: dict[str, Any] | None


async def validate_rollout(
    session: AsyncSession,
    *,
    body: RolloutCreate,
    actor: Actor,
    scope: Scope,
    safety_defaults: SafetyDefaults,
    trusted_keys: TrustedKeys | None,
    refuse_weakened: bool = True,
) -> ValidatedRollout:
    """Everything create checks before it writes: release exists and verifies, targets in
    scope, safety policy (not weaker than the fleet default unless acknowledged)."""
    release = await load_verified_release(
        session, version=body.release_version, trusted_keys=trusted_keys
    )
    targets = body.targets.model_dump(by_alias=True)
    check_targets_in_scope(targets, scope)
    safety, acknowledgement = resolve_safety(
        checks=body.gates.safety_checks,
        defaults=safety_defaults,
        acknowledged=body.acknowledge_weakened_safety,
        reason=body.reason,
        actor=actor,
        field_prefix="gates.safetyChecks",
        refuse=refuse_weakened,
    )
    gates = body.gates.model_dump(by_alias=True)
    gates["safetyChecks"]["requireStationary"] = safety.require_stationary
    gates["safetyChecks"]["minBatteryPercent"] = safety.min_battery_percent
    return ValidatedRollout(release, targets, gates, safety, acknowledgement)


async def plan_rollout_request(
    session: AsyncSession,
    *,
    body: RolloutCreate,
    actor: Actor,
    scope: Scope,
    safety_defaults: SafetyDefaults,
    trusted_keys: TrustedKeys | None,
) -> RolloutPlanOut:
    """The dry run: validate like create (a bad release, signature or scope is refused the
    same way), then plan without writing anything. An unacknowledged weakening and an
    overlap are reported (`canStart: false`, `problems`) rather than refused, so the
    operator sees the whole picture in one answer."""
    v = await validate_rollout(
        session,
        body=body,
        actor=actor,
        scope=scope,
        safety_defaults=safety_defaults,
        trusted_keys=trusted_keys,
        refuse_weakened=False,
    )
    targeted, blocked = await safety_now(session, targets=v.targets, safety=v.safety)
    stages: list[StagePlan] = plan_from_strategy(targeted, body.strategy.model_dump(by_alias=True))
    overlap = await find_overlap(session, targets=v.targets)
    problems = []
    if v.safety.weakened and v.acknowledgement is None:
        problems.append(
            "SAFETY_POLICY_WEAKENED: " + ", ".join(v.safety.weakened) + " weaker than default"
        )
    if overlap.vehicles:
        problems.append(f"CONFLICT: {overlap.vehicles} vehicle(s) inside another active rollout")
    if targeted == 0:
        problems.append("NO_VEHICLES: the targets select no vehicle")
    return RolloutPlanOut(
        release_version=v.release.version,
        targeted=targeted,
        stages=[
            PlannedStage(index=s.index, name=s.name, vehicles=s.size, bake_seconds=s.bake_seconds)
            for s in stages
        ],
        safety=blocked,
        weakened_safety=list(v.safety.weakened),
        maintenance_window=v.gates["safetyChecks"].get("maintenanceWindow"),
        overlap=overlap,
        can_start=not (overlap.vehicles or (v.safety.weakened and v.acknowledgement is None)),
        problems=problems,
    )


async def create_rollout(
    session: AsyncSession,
    *,
    body: RolloutCreate,
    actor: Actor,
    scope: Scope,
    safety_defaults: SafetyDefaults,
    trusted_keys: TrustedKeys | None,
) -> Rollout:
    v = await validate_rollout(
        session,
        body=body,
        actor=actor,
        scope=scope,
        safety_defaults=safety_defaults,
        trusted_keys=trusted_keys,
    )
    await lock_fleet_assignment(session)
    overlap = await find_overlap(session, targets=v.targets)
    if overlap.vehicles:
        raise overlap_conflict(overlap, what="this rollout")
    targets, gates, acknowledgement = v.targets, v.gates, v.acknowledgement

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
    await record_write(
        session,
        actor=actor,
        action="rollout.created",
        target_type="rollout",
        target_id=str(rollout.id),
        reason=body.reason,
        payload=body.model_dump(by_alias=True, mode="json"),
        acknowledgement=acknowledgement,
        targets=targets,
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
    stmt = select(Rollout).where(*rollouts_in_scope(scope))
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
    stmt = select(Rollout).where(col(Rollout.id) == rollout_id, *rollouts_in_scope(scope))
    rollout = (await session.exec(stmt)).first()
    if rollout is None:
        raise NotFound(f"rollout {rollout_id} not found")
    return rollout


# --- control (pause, resume, rollback, abort) ---------------------------------------------

CONTROL_ACTIONS = ("pause", "resume", "rollback", "abort")


async def record_control(
    session: AsyncSession,
    *,
    rollout: Rollout,
    action: str,
    outcome: str,
    reason: str,
    actor: Actor,
    result: str = "ok",
    detail: dict[str, Any] | None = None,
) -> None:
    """The audit entry `rollout.{action}_{outcome}` (requested, rejected, failed) for an
    operator's control request, in the caller's transaction."""
    await audit.record(
        session,
        actor=actor.subject,
        role=actor.role,
        source=actor.source,
        action=f"rollout.{action}_{outcome}",
        target_type="rollout",
        target_id=str(rollout.id),
        reason=reason,
        correlation_id=actor.correlation_id,
        payload={"action": action, "statusBefore": rollout.status, **(detail or {})},
        result=result,
        **audit_scope(rollout.targets or {}),
    )


async def request_control(
    session: AsyncSession,
    *,
    scope: Scope,
    rollout_id: int,
    action: str,
    reason: str,
    actor: Actor,
    force: bool = False,
) -> tuple[Rollout, str | None]:
    """Audit an operator's control request. Returns the rollout and, when its status is
    terminal (so no workflow could accept it), the refusal message; the refusal is audited
    too (`rollout.{action}_rejected`, result `rejected`). The caller commits either way."""
    if action not in CONTROL_ACTIONS:
        raise InvalidInput(f"unknown action {action!r}")
    if force and action != "resume":
        raise InvalidInput(
            "force applies to resume only",
            details=[{"field": "force", "message": "only with resume"}],
        )
    rollout = await get_rollout(session, scope=scope, rollout_id=rollout_id)
    detail = {"force": True} if force else {}
    if RolloutStatus(rollout.status) in TERMINAL_ROLLOUT_STATUSES:
        message = f"cannot {action} rollout {rollout_id}: it is {rollout.status}"
        await record_control(
            session,
            rollout=rollout,
            action=action,
            outcome="rejected",
            reason=reason,
            actor=actor,
            result="rejected",
            detail={"message": message, **detail},
        )
        return rollout, message
    await record_control(
        session,
        rollout=rollout,
        action=action,
        outcome="requested",
        reason=reason,
        actor=actor,
        detail=detail,
    )
    return rollout, None


# --- a rollout's vehicles -----------------------------------------------------------------

ROLLOUT_VEHICLE_SORT = Sort(SortKey("vehicleId", col(RolloutTarget.vehicle_id)), False)


@dataclass(frozen=True)
class RolloutVehicleRow:
    target: RolloutTarget
    vehicle: Vehicle
    stage_name: str


def stage_names(rollout: Rollout) -> list[str]:
    return [s.name for s in plan_from_strategy(0, rollout.strategy or {})]


async def list_rollout_vehicles(
    session: AsyncSession,
    *,
    scope: Scope,
    rollout_id: int,
    states: list[str],
    stages: list[str],
    cursor: str | None,
    limit: int,
) -> tuple[list[RolloutVehicleRow], str | None]:
    """Per-vehicle state inside one rollout, keyset on vehicle id; filters state and stage
    (by name: `canary`, `wave-1`, ...)."""
    rollout = await get_rollout(session, scope=scope, rollout_id=rollout_id)
    allowed = {s.value for s in TargetState}
    for state in states:
        if state not in allowed:
            raise InvalidInput(
                f"unknown state {state!r}",
                details=[{"field": "state", "message": f"one of {sorted(allowed)}"}],
            )
    names = stage_names(rollout)
    indexes = []
    for stage in stages:
        if stage not in names:
            raise InvalidInput(
                f"unknown stage {stage!r}",
                details=[{"field": "stage", "message": f"one of {names}"}],
            )
        indexes.append(names.index(stage))
    stmt = vehicles_in_scope(
        select(RolloutTarget, Vehicle)
        .join(Vehicle, col(Vehicle.id) == col(RolloutTarget.vehicle_id))
        .where(col(RolloutTarget.rollout_id) == rollout_id),
        scope,
    )
    for column, values in (
        (col(RolloutTarget.state), states),
        (col(RolloutTarget.stage), indexes),
    ):
        cond = any_of(column, values)
        if cond is not None:
            stmt = stmt.where(cond)
    if cursor:
        _, after = decode_cursor(cursor, ROLLOUT_VEHICLE_SORT)
        stmt = stmt.where(col(RolloutTarget.vehicle_id) > str(after))
    stmt = stmt.order_by(col(RolloutTarget.vehicle_id)).limit(limit + 1)
    rows = [
        RolloutVehicleRow(
            target=t,
            vehicle=v,
            stage_name=names[t.stage] if 0 <= t.stage < len(names) else str(t.stage),
        )
        for t, v in (await session.exec(stmt)).all()
    ]
    return split_page(
        rows,
        sort=ROLLOUT_VEHICLE_SORT,
        limit=limit,
        value_of=lambda r: r.target.vehicle_id,
        id_of=lambda r: r.target.vehicle_id,
    )
