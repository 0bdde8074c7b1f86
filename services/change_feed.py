"""The SSE change feed: written in the transaction of the change it describes.

Rollouts, audit entries and the fleet summary get one row per change. Vehicles change in bulk
(a telemetry group, a desired state issued to a selection), so their `vehicle.updated` rows
each carry up to `VEHICLE_DELTAS_PER_ROW` vehicles' deltas: `{"vehicles": [{"id", "status",
"reasonCodes", "region", "model", "org", ...}]}`, in id order, and leave the row's scope
columns empty: a reader scopes each delta by its own region, model and org
(docs/data-model.md). One row per vehicle was a third of the cost of a status change at fleet
rate; batched rows are also what a subscriber receives (bounded, batched deltas).
"""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from models.tables import ChangeFeed

VEHICLE_DELTAS_PER_ROW = 500


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
