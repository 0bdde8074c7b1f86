"""The consistency check of the telemetry path: a vehicle's status derived from scratch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from services.vehicle_status import LatestEvent, derive_status


async def recompute_statuses(
    session: AsyncSession,
    *,
    vehicle_ids: list[str],
    offline_after_seconds: int,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Recompute the status of these vehicles from scratch (their desired state, the latest
    event of their timeline by `(epoch, seq)` (ties: the lowest event id, as the write path
    picks it), their latest heartbeat) and return every vehicle whose stored status or
    reason codes differ. The consistency check of the telemetry path."""
    now = now or datetime.now(UTC)
    conn = await session.connection()
    rows = await conn.execute(
        text(
            """
            SELECT v.id, v.status, v.reason_codes, v.desired_release_version,
                   v.desired_state_id, v.created_at,
                   coalesce(narrow.actual_release_version, v.actual_release_version)
                       AS actual_release_version,
                   greatest(narrow.last_seen_at, v.last_seen_at) AS last_seen_at,
                   latest.type AS event_type,
                   latest.desired_state_id AS event_desired_state_id,
                   latest.release_version AS event_release_version,
                   latest.reason_code AS event_reason_code
            FROM vehicles v
            LEFT JOIN vehicle_telemetry narrow ON narrow.vehicle_id = v.id
            LEFT JOIN LATERAL (
                SELECT type, desired_state_id, release_version, reason_code
                FROM timeline_events te WHERE te.vehicle_id = v.id
                ORDER BY epoch DESC, seq DESC, received_at, event_id LIMIT 1
            ) latest ON true
            WHERE v.id = ANY(CAST(:ids AS text[]))
            ORDER BY v.id
            """
        ),
        {"ids": vehicle_ids},
    )
    mismatches = []
    for row in rows:
        derived = derive_status(
            desired_release=row.desired_release_version,
            desired_state_id=str(row.desired_state_id) if row.desired_state_id else None,
            actual_release=row.actual_release_version,
            latest_event=LatestEvent(
                type=row.event_type,
                desired_state_id=str(row.event_desired_state_id)
                if row.event_desired_state_id
                else None,
                release_version=row.event_release_version,
                reason_code=row.event_reason_code,
            )
            if row.event_type
            else None,
            last_seen_at=row.last_seen_at,
            registered_at=row.created_at,
            now=now,
            offline_after_seconds=offline_after_seconds,
        )
        stored = (row.status, list(row.reason_codes or []))
        if stored != (derived.status.value, list(derived.reason_codes)):
            mismatches.append(
                {
                    "id": row.id,
                    "stored": stored,
                    "derived": (derived.status.value, list(derived.reason_codes)),
                }
            )
    return mismatches
