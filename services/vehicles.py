"""Vehicle queries: the fleet list with keyset pagination, filters and scope, and one vehicle."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from sqlalchemy import text
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import fetch
from core.errors import Conflict, InvalidInput, NotFound
from models.api import VehicleIn
from models.enums import VehicleStatus
from models.scope import Scope
from models.tables import TimelineEvent, Vehicle
from services import audit, change_feed
from services.audit import Actor
from services.pagination import (
    Sort,
    SortKey,
    check_choices,
    check_rollout_ids,
    decode_cursor,
    keyset_sql,
    parse_sort,
    split_page,
    timestamp_key,
)
from services.scope import check_may_register, match_sql, rollout_scope_sql, vehicle_scope_sql
from services.vehicle_status import derive_status

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
        check_choices(self.statuses, sorted(VehicleStatus), field="status", noun="status")
        for code in self.reason_codes:
            if not REASON_CODE.match(code):
                raise InvalidInput(
                    f"malformed reason code {code!r}",
                    details=[{"field": "reasonCode", "message": "UPPER_SNAKE, at most 64"}],
                )
        check_rollout_ids(self.rollout_ids)
        if self.q is not None and len(self.q) > 128:
            raise InvalidInput(
                "q is too long", details=[{"field": "q", "message": "at most 128 characters"}]
            )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# The vehicle's columns as the API shows them (`vehicle_out`); the telemetry ones come from
# the narrow telemetry row where it is fresher (the wide row may lag on lastSeenAt).
_PLAIN_COLUMNS = (
    "id", "model", "region", "ring", "org", "metadata", "desired_release_version",
    "desired_state_id", "rollout_id", "status", "reason_codes", "updated_at",
)  # fmt: skip
_TELEMETRY_COLUMNS = ("last_seen_at", "battery_percent", "stationary", "actual_release_version")
VEHICLE_COLUMNS = ", ".join(f"v.{c}" for c in _PLAIN_COLUMNS + _TELEMETRY_COLUMNS)
_FRESHEST = ", ".join(
    f"CASE WHEN f.fresher THEN t.{c} ELSE v.{c} END AS {c}" for c in _TELEMETRY_COLUMNS
)
_FILTERED_COLUMNS = (  # filter name in VehicleFilters, column
    ("models", "model"),
    ("regions", "region"),
    ("rings", "ring"),
    ("release_versions", "actual_release_version"),
)


def vehicle_list_query(
    *, scope: Scope, filters: VehicleFilters, sort: str | None, cursor: str | None, limit: int
) -> tuple[str, dict[str, Any], Sort]:
    """The statement (psycopg placeholders) of one page of the fleet, its parameters and its
    sort. A single value of a filter is `=`, so the `(column, id)` index gives the rows in
    keyset order (bench/api_reads.py shows the plans at a million vehicles)."""
    filters.validate()
    order = parse_sort(sort, VEHICLE_SORTS, "id")
    where, params = vehicle_scope_sql(scope, "v", driver=True)
    clauses = [where]
    for name, column in _FILTERED_COLUMNS:
        values: list[str] = getattr(filters, name)
        if values:
            clauses.append(match_sql(f"v.{column}", f"f_{column}", values, params, driver=True))
    if filters.rollout_ids:
        # vehicles.rollout_id has no index (a rollout's issue must stay a HOT update): the
        # rollout's targets (primary key rollout_id, vehicle_id) give the vehicles in id order.
        params["rollout_ids"] = [int(r) for r in filters.rollout_ids]
        clauses.append(
            " AND v.rollout_id = ANY(%(rollout_ids)s::bigint[]) AND v.id IN (SELECT vehicle_id"
            " FROM rollout_targets WHERE rollout_id = ANY(%(rollout_ids)s::bigint[]))"
        )
        if not scope.unrestricted:  # a rollout outside the scope selects nothing
            inside, rollout_params = rollout_scope_sql(scope, "r")
            params.update(rollout_params)
            clauses.append(
                " AND v.rollout_id IN (SELECT r.id FROM rollouts r"
                f" WHERE r.id = ANY(%(rollout_ids)s::bigint[]){inside})"
            )
    if filters.reason_codes:
        clauses.append(" AND v.reason_codes && %(reason_codes)s::text[]")
        params["reason_codes"] = list(filters.reason_codes)
    if filters.q:
        clauses.append(" AND v.id LIKE %(q)s ESCAPE '\\'")
        params["q"] = _escape_like(filters.q) + "%"
    # vehicles.status has no index (a status change must stay a HOT update): the keys of
    # vehicles_by_status (migration 0011) give the fleet in status order and one status's
    # vehicles in id order. Several statuses: one branch per status, each its own ordered,
    # limited walk, merged (a single `status = ANY` walk is not in id order, and PostgreSQL
    # then sorts every vehicle of those statuses).
    by_key = bool(filters.statuses) or order.key.name == "status"
    alias = "k" if by_key and order.key.name != "lastSeenAt" else "v"
    tail = keyset_sql(order, alias=alias, id_kind="text", cursor=cursor, limit=limit, params=params)
    columns = f"{VEHICLE_COLUMNS}, v.last_seen_key"
    filtered = "".join(clauses)
    if not by_key:
        statement = f"SELECT {columns} FROM vehicles v WHERE true{filtered}{tail}"
    elif not filters.statuses:
        statement = (
            f"SELECT {columns} FROM vehicles_by_status k JOIN vehicles v ON v.id = k.id"
            f" WHERE true{filtered}{tail}"
        )
    else:
        branches = []
        for i, status in enumerate(dict.fromkeys(filters.statuses)):
            params[f"k_status_{i}"] = status
            branches.append(
                f"(SELECT {columns} FROM vehicles_by_status k JOIN vehicles v ON v.id = k.id"
                f" WHERE k.status = %(k_status_{i})s{filtered}{tail})"
            )
        merged = keyset_sql(
            order, alias="s", id_kind="text", cursor=None, limit=limit, params=params
        )
        statement = f"SELECT * FROM ({' UNION ALL '.join(branches)}) s{merged}"
    return statement, params, order


async def list_vehicles(
    conn: AsyncConnection[Any],
    *,
    scope: Scope,
    filters: VehicleFilters,
    sort: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the fleet, in one statement on the driver (core/db.py)."""
    statement, params, order = vehicle_list_query(
        scope=scope, filters=filters, sort=sort, cursor=cursor, limit=limit
    )
    rows = await hide_unseen_rollouts(conn, scope=scope, rows=await fetch(conn, statement, params))
    key = order.key.column.name
    return split_page(
        rows, sort=order, limit=limit, value_of=lambda r: r[key], id_of=lambda r: r["id"]
    )


async def get_vehicle_view(
    conn: AsyncConnection[Any], *, scope: Scope, vehicle_id: str
) -> dict[str, Any]:
    """One vehicle inside `scope` as the API shows it, in one statement on the driver."""
    where, params = vehicle_scope_sql(scope, "v", driver=True)
    plain = ", ".join(f"v.{c}" for c in _PLAIN_COLUMNS)
    rows = await fetch(
        conn,
        f"SELECT {plain}, {_FRESHEST} FROM vehicles v"
        " LEFT JOIN vehicle_telemetry t ON t.vehicle_id = v.id"
        " CROSS JOIN LATERAL (SELECT coalesce(t.last_seen_at > v.last_seen_at,"
        " t.last_seen_at IS NOT NULL) AS fresher) f"
        f" WHERE v.id = %(id)s{where}",
        {"id": vehicle_id, **params},
    )
    if not rows:
        raise NotFound(f"vehicle {vehicle_id!r} not found")
    [row] = await hide_unseen_rollouts(conn, scope=scope, rows=rows)
    return row


async def hide_unseen_rollouts(
    conn: AsyncConnection[Any], *, scope: Scope, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rows` (with `rollout_id`) with the id of a rollout outside `scope` removed: a scoped
    caller's vehicle may be inside a rollout that also reaches outside its scope, and that
    rollout's id is not the caller's to see (`GET /rollouts/{id}` is 404 for it). One more
    statement, only for a scoped caller and a page that names rollouts."""
    ids = sorted({r["rollout_id"] for r in rows if r["rollout_id"] is not None})
    if scope.unrestricted or not ids:
        return rows
    inside, params = rollout_scope_sql(scope, "r")
    seen = await fetch(
        conn,
        f"SELECT r.id FROM rollouts r WHERE r.id = ANY(%(ids)s){inside}",
        {"ids": ids, **params},
    )
    visible = {r["id"] for r in seen}
    for row in rows:
        if row["rollout_id"] not in visible:
            row["rollout_id"] = None
    return rows


# --- One vehicle's desired state (for the vehicle itself) and its timeline -----------------


@dataclass(frozen=True)
class DesiredStateView:
    vehicle_id: str
    desired_state_id: str | None
    release_version: str | None
    rollout_id: int | None
    components: list[dict[str, Any]]
    artifact_digest: str | None
    signature: str | None
    signing_key_id: str | None
    created_at: datetime | None
    constraints: dict[str, Any] | None = None

    @property
    def etag(self) -> str:
        """Strong ETag: changes whenever the desired state does, its constraints included."""
        constraints = json.dumps(self.constraints, sort_keys=True)
        digest = hashlib.sha256(
            f"{self.desired_state_id}|{self.release_version}|{self.rollout_id}|{constraints}".encode()
        ).hexdigest()[:32]
        return f'"{digest}"'


async def get_desired_state(session: AsyncSession, *, vehicle_id: str) -> DesiredStateView:
    """What the vehicle should run: its current desired state (kept on the vehicle row by the
    rollout path) with the release's components and signature to verify before applying."""
    conn = await session.connection()
    row = (
        await conn.execute(
            text(
                """
                SELECT v.id, v.desired_state_id, v.desired_release_version, v.rollout_id,
                       ds.created_at, ds.constraints, r.components, r.artifact_digest,
                       r.signature, r.signing_key_id
                FROM vehicles v
                LEFT JOIN desired_states ds ON ds.id = v.desired_state_id
                LEFT JOIN releases r ON r.version = v.desired_release_version
                WHERE v.id = :id
                """
            ),
            {"id": vehicle_id},
        )
    ).first()
    if row is None:
        raise NotFound(f"vehicle {vehicle_id!r} not found")
    return DesiredStateView(
        vehicle_id=row.id,
        desired_state_id=str(row.desired_state_id) if row.desired_state_id else None,
        release_version=row.desired_release_version,
        rollout_id=row.rollout_id,
        components=list(row.components or []),
        artifact_digest=row.artifact_digest,
        signature=row.signature,
        signing_key_id=row.signing_key_id,
        created_at=row.created_at,
        constraints=row.constraints,
    )


TIMELINE_SORT = Sort(SortKey("seq", col(TimelineEvent.seq), "epoch_seq"), descending=True)
TIMELINE_COLUMNS = (
    "e.event_id, e.vehicle_id, e.seq, e.epoch, e.type, e.occurred_at, e.received_at,"
    " e.desired_state_id, e.release_version, e.reason_code, e.details"
)


def _timeline_position(event: dict[str, Any]) -> Any:
    """A cursor's value: the event's `seq`, or `[epoch, seq]` past epoch 0 (the cursors of
    timelines without epochs keep their form)."""
    return [event["epoch"], event["seq"]] if event["epoch"] else event["seq"]


def timeline_query(
    *, scope: Scope, vehicle_id: str, cursor: str | None, limit: int
) -> tuple[str, dict[str, Any]]:
    """The statement of one page of a vehicle's timeline (`list_timeline`) and its parameters."""
    where, params = vehicle_scope_sql(scope, "v", driver=True)
    params.update(id=vehicle_id, limit=limit + 1)
    after = ""
    if cursor:
        (epoch, seq), ident = decode_cursor(cursor, TIMELINE_SORT, id_kind="uuid")
        params.update(after_epoch=epoch, after_seq=seq, after_id=ident)
        after = " AND (e.epoch, e.seq, e.event_id) < (%(after_epoch)s, %(after_seq)s, %(after_id)s)"
    statement = (
        f"SELECT {TIMELINE_COLUMNS} FROM vehicles v LEFT JOIN LATERAL ("
        f" SELECT * FROM timeline_events e WHERE e.vehicle_id = %(id)s{after}"
        " ORDER BY e.epoch DESC, e.seq DESC, e.event_id DESC LIMIT %(limit)s) e ON true"
        f" WHERE v.id = %(id)s{where}"
    )
    return statement, params


async def list_timeline(
    conn: AsyncConnection[Any], *, scope: Scope, vehicle_id: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """A vehicle's timeline, newest first (`(epoch, seq)` descending, then event id): keyset
    over the `(vehicle_id, epoch, seq)` index of one partition. One statement: no row at all
    when the vehicle is not inside `scope` (404), one row of nulls when it has no events."""
    statement, params = timeline_query(
        scope=scope, vehicle_id=vehicle_id, cursor=cursor, limit=limit
    )
    rows = await fetch(conn, statement, params)
    if not rows:
        raise NotFound(f"vehicle {vehicle_id!r} not found")
    events = [r for r in rows if r["event_id"] is not None]
    return split_page(
        events,
        sort=TIMELINE_SORT,
        limit=limit,
        value_of=_timeline_position,
        id_of=lambda e: str(e["event_id"]),
    )


# Registration ------------------------------------------------------------------------------

# One statement: the new rows, and their `vehicle.updated` deltas in the change feed (a
# shortfall, an id registered already, rolls both back).
_REGISTER = text(
    f"""
    WITH ins AS (
        INSERT INTO vehicles (id, model, region, ring, org, metadata, status)
        SELECT r.id, r.model, r.region, r.ring, r.org, coalesce(r.metadata, '{{}}'), :status
        FROM jsonb_to_recordset(CAST(:rows AS jsonb))
             AS r(id text, model text, region text, ring text, org text, metadata jsonb)
        ORDER BY r.id
        ON CONFLICT (id) DO NOTHING
        RETURNING id, region, model, org, status, reason_codes
    ),
    feed AS ({
        change_feed.vehicle_deltas_sql(
            "ins",
            "'status', s.status, 'reasonCodes', to_jsonb(s.reason_codes), 'registered', true",
        )
    })
    SELECT id FROM ins
    """
)


async def register_vehicles(
    session: AsyncSession,
    *,
    vehicles: list[VehicleIn],
    scope: Scope,
    actor: Actor,
    scoped_registration: bool = False,
) -> list[dict[str, Any]]:
    """Register new vehicles, all or none (the caller commits): a scoped caller 403 unless
    `scoped_registration` (then a vehicle outside its scope 403), both before any id is
    looked up (`services.scope.check_may_register`); an id twice in the request 422, an id
    registered already 409, and nothing is stored. Their status is `derive_status`'s for a
    vehicle with nothing to converge to, seen at registration. Audited as
    `vehicle.registered` (one entry per request, in its transaction); the change feed
    announces them (`vehicle.updated`)."""
    check_may_register([v.model_dump() for v in vehicles], scope, scoped=scoped_registration)
    seen: dict[str, int] = {}
    details: list[dict[str, Any]] = []
    for index, v in enumerate(vehicles):
        if v.id in seen:
            details.append({"field": f"vehicles.{index}.id", "message": f"{v.id!r} twice"})
        seen[v.id] = index
    if details:
        raise InvalidInput("a vehicle id appears twice in the request", details=details)
    now = datetime.now(UTC)
    status = derive_status(
        desired_release=None,
        desired_state_id=None,
        actual_release=None,
        latest_event=None,
        last_seen_at=None,
        registered_at=now,
        now=now,
        offline_after_seconds=1,
    ).status
    conn = await session.connection()
    rows = [v.model_dump() for v in vehicles]
    inserted = {
        r[0]
        for r in await conn.execute(_REGISTER, {"rows": json.dumps(rows), "status": str(status)})
    }
    if len(inserted) < len(vehicles):  # the request's transaction rolls back on the error
        taken = [
            {"field": f"vehicles.{seen[v]}.id", "message": f"{v!r} is registered already"}
            for v in sorted(set(seen) - inserted)
        ]
        raise Conflict("a vehicle is registered already", details=taken)
    await audit.record(
        session,
        actor=actor,
        action="vehicle.registered",
        target_type="vehicle",
        target_id=vehicles[0].id if len(vehicles) == 1 else None,
        payload={
            "vehicles": [{k: r[k] for k in ("id", "model", "region", "ring", "org")} for r in rows]
        },
        regions=sorted({v.region for v in vehicles}),
        models=sorted({v.model for v in vehicles}),
        orgs=sorted({v.org for v in vehicles}),
    )
    found = await conn.execute(
        text(f"SELECT {VEHICLE_COLUMNS} FROM vehicles v WHERE v.id = ANY(:ids)"),
        {"ids": sorted(inserted)},
    )
    return sorted((dict(r) for r in found.mappings()), key=lambda r: seen[r["id"]])
