"""The checked pass: before anything is written, refuse (whole) each request that names a
vehicle unknown or outside its caller's scope. Run first for groups with a scoped caller, and
for any group whose optimistic pass met an unknown vehicle (services/telemetry/write.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from models.telemetry import EventIn, HeartbeatIn
from services.scope import allows_vehicle
from services.telemetry.group import GroupRequest

_MAX_DETAILS = 20  # a refused request lists its unknown vehicles up to about this many


async def refuse_requests(
    driver: psycopg.AsyncConnection[Any], requests: list[GroupRequest]
) -> bool:
    """Mark refused (whole) each request naming a vehicle that is unknown or outside its
    caller's scope (region, model, org). Returns whether any request was refused."""
    wanted = sorted(
        {h.vehicle_id for r in requests for h in r.batch.heartbeats}
        | {e.vehicle_id for r in requests for e in r.batch.events}
    )
    async with driver.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, region, model, org FROM vehicles WHERE id = ANY(%s)", (wanted,)
        )
        places = {place.pop("id"): place for place in await cur.fetchall()}
    refused_any = False
    for req in requests:
        if req.refused is not None:
            continue
        details: list[dict[str, Any]] = []
        named: list[tuple[str, Sequence[HeartbeatIn | EventIn]]] = [
            ("heartbeats", req.batch.heartbeats),
            ("events", req.batch.events),
        ]
        for kind, items in named:
            for index, item in enumerate(items):
                place = places.get(item.vehicle_id)
                if place is None or not allows_vehicle(req.scope, **place):
                    details.append(
                        {
                            "field": f"{kind}.{index}.vehicleId",
                            "index": index,
                            "message": f"vehicle {item.vehicle_id!r} not found",
                        }
                    )
                    if len(details) >= _MAX_DETAILS:
                        break
        if details:
            req.refused = details
            refused_any = True
    return refused_any
