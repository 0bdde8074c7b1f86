"""Reading rollouts: the API's lists and one rollout (inside the caller's scope, through the
ORM), and the rows the workflow's activities read by id (the rollout, its policy, its
counters)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import NotFound, RolloutNotFound
from models.enums import RolloutStatus, TargetState
from models.scope import Scope
from models.tables import Rollout, RolloutTarget, Vehicle
from models.workflows import RolloutCounts, RolloutPolicy
from services.pagination import (
    Sort,
    SortKey,
    check_choices,
    decode_cursor,
    keyset,
    parse_sort,
    split_page,
    timestamp_key,
    where_any_of,
)
from services.rollouts.counters import COUNTS_COLUMNS
from services.scope import rollouts_in_scope, vehicles_in_scope
from workflows.policy import plan_from_strategy, rollout_policy


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    """How many rollouts are in each status (the rollouts-by-status gauge of /metrics)."""
    rows = await conn.execute(text("SELECT status, count(*) FROM rollouts GROUP BY status"))
    return {str(status): int(n) for status, n in rows}


ROLLOUT_SORTS = (
    SortKey("id", col(Rollout.id), "int"),
    timestamp_key("createdAt", col(Rollout.created_at)),
    SortKey("status", col(Rollout.status)),
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
    check_choices(statuses, sorted(RolloutStatus), field="status", noun="status")
    order = parse_sort(sort, ROLLOUT_SORTS, "-id")
    stmt = select(Rollout).where(*rollouts_in_scope(scope))
    stmt = where_any_of(
        stmt,
        (col(Rollout.status), statuses),
        (col(Rollout.release_version), release_versions),
    )
    stmt = keyset(
        stmt, sort=order, id_column=col(Rollout.id), id_kind="int", cursor=cursor, limit=limit
    )
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
    check_choices(states, sorted(TargetState), field="state", noun="state")
    names = stage_names(rollout)
    check_choices(stages, names, field="stage", noun="stage")
    indexes = [names.index(stage) for stage in stages]
    stmt = vehicles_in_scope(
        select(RolloutTarget, Vehicle)
        .join(Vehicle, col(Vehicle.id) == col(RolloutTarget.vehicle_id))
        .where(col(RolloutTarget.rollout_id) == rollout_id),
        scope,
    )
    stmt = where_any_of(
        stmt,
        (col(RolloutTarget.state), states),
        (col(RolloutTarget.stage), indexes),
    )
    if cursor:
        _, after = decode_cursor(cursor, ROLLOUT_VEHICLE_SORT, id_kind="text")
        stmt = stmt.where(col(RolloutTarget.vehicle_id) > after)
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


# --- By id, for the workflow's activities ------------------------------------------------


@dataclass(frozen=True)
class RolloutRow:
    """What the workflow path reads of a rollout: its release, targets and plan."""

    release_version: str
    targets: dict[str, Any]
    strategy: dict[str, Any]
    targeted: int
    stage_count: int


async def rollout_columns(
    session: AsyncSession, *, rollout_id: int, columns: str, for_update: bool = False
) -> Row[Any]:
    """`columns` (SQL) of the rollout's row, locked `for_update`; `RolloutNotFound` when
    there is no such rollout (its workflow outlived it). Every read by id goes through here."""
    conn = await session.connection()
    lock = " FOR UPDATE" if for_update else ""
    row = (
        await conn.execute(
            text(f"SELECT {columns} FROM rollouts WHERE id = :rid{lock}"), {"rid": rollout_id}
        )
    ).one_or_none()
    if row is None:
        raise RolloutNotFound(f"rollout {rollout_id} does not exist")
    return row


async def load_rollout(
    session: AsyncSession, *, rollout_id: int, for_update: bool = False
) -> RolloutRow:
    row = await rollout_columns(
        session,
        rollout_id=rollout_id,
        columns="release_version, targets, strategy, targeted, stage_count",
        for_update=for_update,
    )
    return RolloutRow(
        release_version=row.release_version,
        targets=as_dict(row.targets),
        strategy=as_dict(row.strategy),
        targeted=row.targeted,
        stage_count=row.stage_count,
    )


def as_dict(value: Any) -> dict[str, Any]:
    """A JSON column as a dict (psycopg parses jsonb; text() may hand over a string)."""
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value or {})


async def load_policy(session: AsyncSession, *, rollout_id: int) -> RolloutPolicy:
    """The rollout's gates, safety checks, timeouts and retry settings (pure parsing in
    `workflows.policy.rollout_policy`)."""
    row = await rollout_columns(session, rollout_id=rollout_id, columns="gates, timeouts, retry")
    return rollout_policy(as_dict(row.gates), as_dict(row.timeouts), as_dict(row.retry))


async def progress(session: AsyncSession, *, rollout_id: int) -> RolloutCounts:
    """The rollout's counters, read from its row (never a scan of its targets)."""
    row = await rollout_columns(session, rollout_id=rollout_id, columns=COUNTS_COLUMNS)
    return RolloutCounts.model_validate(row._asdict())


async def gate_counters(session: AsyncSession, *, rollout_id: int) -> tuple[RolloutCounts, int]:
    """The rollout's counters and its `rechecked` counter (targets notified again by the
    blocked re-check and not done yet, services/rollouts/counters.py), in one read of its
    row; `rechecked` stays out of RolloutCounts, the API's `progress`."""
    row = await rollout_columns(
        session, rollout_id=rollout_id, columns=COUNTS_COLUMNS + ", rechecked"
    )
    data = row._asdict()
    return RolloutCounts.model_validate(data), int(data["rechecked"])
