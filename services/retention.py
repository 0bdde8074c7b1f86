"""Retention: the change feed and the vehicle timeline purged past their retention, in
bounded batches, each the caller's transaction (the audit log's purge is `services.audit`'s).
Run by the `motorcade-retention` Schedule's activities (activities/retention.py); every batch
is idempotent (it deletes what is past a cutoff, whatever an earlier attempt did)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

# The oldest `batch` rows by id (the primary key, from its low end); of them, the run of rows
# older than the cutoff, stopping at the first newer one: the purge deletes a contiguous
# range from the bottom, so what is kept is exactly "every id from the oldest kept one" and a
# resume below it is known to be incomplete (services/stream.py). The newest row is always
# kept: a quiet feed is never emptied (a resume from its last id stays exact).
_PURGE_CHANGE_FEED = text(
    """
    WITH bottom AS (
        SELECT id, created_at FROM change_feed ORDER BY id LIMIT :batch
    ), upto AS (
        SELECT least(
            coalesce((SELECT min(id) - 1 FROM bottom WHERE created_at >= :cutoff),
                     (SELECT max(id) FROM bottom)),
            (SELECT max(id) - 1 FROM change_feed)
        ) AS id
    )
    DELETE FROM change_feed WHERE id <= (SELECT id FROM upto)
    """
)


async def purge_change_feed_batch(session: AsyncSession, *, cutoff: datetime, batch: int) -> int:
    """Delete up to `batch` of the oldest change-feed rows created before `cutoff` (never the
    newest row). The caller commits. Returns how many went."""
    conn = await session.connection()
    result = await conn.execute(_PURGE_CHANGE_FEED, {"cutoff": cutoff, "batch": batch})
    return max(result.rowcount or 0, 0)  # type: ignore[attr-defined]


async def timeline_partitions(session: AsyncSession) -> list[str]:
    """The partitions of `timeline_events` (16 hash partitions), in name order."""
    conn = await session.connection()
    rows = await conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'timeline_events'::regclass ORDER BY c.relname"
        )
    )
    return [r[0] for r in rows]


async def purge_timeline_batch(
    session: AsyncSession, *, partition: str, cutoff: datetime, batch: int
) -> int:
    """Delete up to `batch` events of one timeline partition received before `cutoff`, oldest
    first (its `received_at` index, migration 0016). The caller commits. Returns how many
    went. A vehicle's status does not depend on them (its latest event lives on the vehicle,
    migration 0008)."""
    if not partition.startswith("timeline_events_p") or not partition[17:].isdigit():
        raise ValueError(f"not a timeline partition: {partition!r}")
    conn = await session.connection()
    result = await conn.execute(
        text(
            f"DELETE FROM {partition} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {partition} WHERE received_at < :cutoff"
            " ORDER BY received_at LIMIT :batch))"
        ),
        {"cutoff": cutoff, "batch": batch},
    )
    return max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
