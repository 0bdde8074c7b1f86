"""The SSE change feed: written in the transaction of the change it describes.

Rollouts, audit entries and the fleet summary get one row per change. Vehicles change in bulk
(a telemetry group, a desired state issued to a selection), so their `vehicle.updated` rows
each carry up to `VEHICLE_DELTAS_PER_ROW` vehicles' deltas: `{"vehicles": [{"id", "status",
"reasonCodes", "region", "model", "org", ...}]}`, in id order, and leave the row's scope
columns empty: a reader scopes each delta by its own region, model and org
(docs/data-model.md). One row per vehicle was one more insert for every status change at
fleet rate; batched rows are also what a subscriber receives (bounded, batched deltas).
"""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from models.tables import ChangeFeed

VEHICLE_DELTAS_PER_ROW = 500


def vehicle_deltas_sql(source: str, fields: str) -> str:
    """The `INSERT` (for a data-modifying CTE of the writer's statement) that appends the rows
    of `source` (a relation or a parenthesized query with `id`, `region`, `model`, `org`,
    read as `s`) as `vehicle.updated` rows of up to `VEHICLE_DELTAS_PER_ROW` deltas in id
    order. Each delta is its scope plus `fields`, `jsonb_build_object` arguments over `s`.
    Writes nothing when `source` is empty."""
    return f"""
        INSERT INTO change_feed (topic, event, entity_id, payload)
        SELECT 'vehicles', 'vehicle.updated', NULL,
               jsonb_build_object('vehicles', jsonb_agg(d.delta ORDER BY d.id))
        FROM (
            SELECT s.id, (row_number() OVER (ORDER BY s.id) - 1) / {VEHICLE_DELTAS_PER_ROW} AS part,
                   jsonb_build_object('id', s.id, 'region', s.region, 'model', s.model,
                                      'org', s.org)
                   || jsonb_build_object({fields}) AS delta
            FROM {source} s
        ) d
        GROUP BY d.part
    """


async def publish(
    session: AsyncSession,
    *,
    topic: str,
    event: str,
    entity_id: str | None,
    payload: dict[str, Any],
    region: str | None = None,
    model: str | None = None,
    org: str | None = None,
) -> None:
    session.add(
        ChangeFeed(
            topic=topic,
            event=event,
            entity_id=entity_id,
            payload=payload,
            region=region,
            model=model,
            org=org,
        )
    )
    await session.flush()
