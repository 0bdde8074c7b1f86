"""The SSE change feed: one row per change, written in the transaction of the change."""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from models.tables import ChangeFeed


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
