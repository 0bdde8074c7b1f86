"""Vehicle queries: the fleet list with keyset pagination, filters and scope, and one vehicle."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from models.enums import VehicleStatus
from models.scope import Scope
from models.tables import RolloutTarget, Vehicle
from services.errors import InvalidInput, NotFoundError
from services.pagination import SortKey, any_of, keyset, parse_sort, split_page, timestamp_key

REASON_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")

VEHICLE_SORTS = (
    SortKey("id", col(Vehicle.id)),
    timestamp_key("lastSeenAt", col(Vehicle.last_seen_key)),
    SortKey("status", col(Vehicle.status)),
)


@dataclass
class VehicleFilters:
    models: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    rings: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    reason_codes: list[str] = field(default_factory=list)
    release_versions: list[str] = field(default_factory=list)
    rollout_ids: list[str] = field(default_factory=list)
    q: str | None = None

    def validate(self) -> None:
        allowed = {s.value for s in VehicleStatus}
        for status in self.statuses:
            if status not in allowed:
                raise InvalidInput(
                    f"unknown status {status!r}",
                    details=[{"field": "status", "message": f"one of {sorted(allowed)}"}],
                )
        for code in self.reason_codes:
            if not REASON_CODE.match(code):
                raise InvalidInput(
                    f"malformed reason code {code!r}",
                    details=[{"field": "reasonCode", "message": "UPPER_SNAKE, at most 64"}],
                )
        for rid in self.rollout_ids:
            if not rid.isdigit():
                raise InvalidInput(
                    f"rolloutId {rid!r} is not a rollout id",
                    details=[{"field": "rolloutId", "message": "a positive integer"}],
                )
        if self.q is not None and len(self.q) > 128:
            raise InvalidInput(
                "q is too long", details=[{"field": "q", "message": "at most 128 characters"}]
            )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def scoped(stmt, scope: Scope):  # type: ignore[no-untyped-def]
    """Restrict a vehicles query to the caller's scope."""
    for column, allowed in (
        (Vehicle.region, scope.regions),
        (Vehicle.model, scope.models),
        (Vehicle.org, scope.orgs),
    ):
        if allowed is not None:
            stmt = stmt.where(col(column).in_(list(allowed)))
    return stmt


async def list_vehicles(
    session: AsyncSession,
    *,
    scope: Scope,
    filters: VehicleFilters,
    sort: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Vehicle], str | None]:
    filters.validate()
    order = parse_sort(sort, VEHICLE_SORTS, "id")
    stmt = scoped(select(Vehicle), scope)
    for column, values in (
        (col(Vehicle.model), filters.models),
        (col(Vehicle.region), filters.regions),
        (col(Vehicle.ring), filters.rings),
        (col(Vehicle.status), filters.statuses),
        (col(Vehicle.actual_release_version), filters.release_versions),
    ):
        cond = any_of(column, values)
        if cond is not None:
            stmt = stmt.where(cond)
    if filters.rollout_ids:
        # vehicles.rollout_id has no index (a rollout's issue must stay a HOT update): the
        # rollout's targets (primary key rollout_id, vehicle_id) give the vehicles in id order.
        rollout_ids = [int(r) for r in filters.rollout_ids]
        stmt = stmt.where(
            col(Vehicle.rollout_id).in_(rollout_ids),
            col(Vehicle.id).in_(
                select(col(RolloutTarget.vehicle_id)).where(
                    col(RolloutTarget.rollout_id).in_(rollout_ids)
                )
            ),
        )
    if filters.reason_codes:
        stmt = stmt.where(col(Vehicle.reason_codes).overlap(filters.reason_codes))  # type: ignore[attr-defined]
    if filters.q:
        stmt = stmt.where(col(Vehicle.id).like(_escape_like(filters.q) + "%", escape="\\"))
    stmt = keyset(stmt, sort=order, id_column=col(Vehicle.id), cursor=cursor, limit=limit)
    rows = list((await session.exec(stmt)).all())
    return split_page(
        rows,
        sort=order,
        limit=limit,
        value_of=lambda v: getattr(v, _attr(order.key.name)),
        id_of=lambda v: v.id,
    )


def _attr(sort_name: str) -> str:
    return {"id": "id", "lastSeenAt": "last_seen_key", "status": "status"}[sort_name]


async def get_vehicle(session: AsyncSession, *, scope: Scope, vehicle_id: str) -> Vehicle:
    stmt = scoped(select(Vehicle).where(col(Vehicle.id) == vehicle_id), scope)
    vehicle = (await session.exec(stmt)).first()
    if vehicle is None:
        raise NotFoundError(f"vehicle {vehicle_id!r} not found")
    return vehicle
