"""The group into PostgreSQL: binary COPY into session-local staging tables (emptied at
commit), then one row per vehicle touched, built in SQL: its newest heartbeat and its
highest-`seq` event. The later steps move data from these tables with set-based statements:
no row-by-row statement, no per-value text escaping in Python."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from pydantic_core import to_json
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import session_driver
from services.telemetry.group import Group

# Created on demand in the session of each pooled connection (`staging_connection`), the last
# one last: its existence says all are there. A table keeps its name only while its shape
# stays the same: a server connection can outlive a process and serve another build (a
# pooler in front of PostgreSQL, docs/deployment.md), so a new shape takes a new name (the
# `_e` tables: with epochs and heartbeat arrival times, migration 0013).
_STAGING_TABLES = (
    # The group's events, deduplicated.
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_events_e (
        vehicle_id text, event_id uuid, epoch bigint, seq bigint, type text,
        occurred_at timestamptz, desired_state_id uuid, release_version text,
        reason_code text, details text
    ) ON COMMIT DELETE ROWS
    """,
    # Its newest heartbeat per vehicle (group.py `MergedHeartbeat`).
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_heartbeats_e (
        vehicle_id text, heartbeat_at timestamptz, received_at timestamptz,
        battery_percent smallint, stationary boolean, actual_release_version text
    ) ON COMMIT DELETE ROWS
    """,
    # One row per vehicle touched: its newest heartbeat (if any) and its greatest
    # (epoch, seq) event (event_epoch and event_seq -1 when none).
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_touched_e (
        vehicle_id text, has_heartbeat boolean, heartbeat_at timestamptz,
        received_at timestamptz, battery_percent smallint, stationary boolean,
        actual_release_version text, event_epoch bigint, event_seq bigint, event_type text,
        event_desired_state_id uuid, event_release_version text, event_reason_code text
    ) ON COMMIT DELETE ROWS
    """,
    # The wide rows locked for derivation (lock.py): what the wide update writes to them
    # besides the verdicts, and the address the lock read each at.
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_locked_e (
        vehicle_id text, last_seen_at timestamptz, battery_percent smallint,
        stationary boolean, actual_release_version text, last_event_epoch bigint,
        last_event_seq bigint, last_event_type text, last_event_desired_state_id uuid,
        last_event_release_version text, last_event_reason_code text, row_address tid
    ) ON COMMIT DELETE ROWS
    """,
)
# `details` is staged as JSON text, encoded by pydantic_core (and not at all when empty,
# the common case), and parsed once by PostgreSQL when it moves to the timeline.
_EVENT_TYPES = [
    "text", "uuid", "int8", "int8", "text", "timestamptz", "uuid", "text", "text", "text",
]  # fmt: skip
_HEARTBEAT_TYPES = ["text", "timestamptz", "timestamptz", "int2", "bool", "text"]
_TOUCHED = """
    INSERT INTO ingest_touched_e (vehicle_id, has_heartbeat, heartbeat_at, received_at,
                                  battery_percent, stationary, actual_release_version,
                                  event_epoch, event_seq, event_type, event_desired_state_id,
                                  event_release_version, event_reason_code)
    SELECT coalesce(heartbeat.vehicle_id, latest.vehicle_id), heartbeat.vehicle_id IS NOT NULL,
           heartbeat.heartbeat_at, heartbeat.received_at, heartbeat.battery_percent,
           heartbeat.stationary, heartbeat.actual_release_version, coalesce(latest.epoch, -1),
           coalesce(latest.seq, -1), latest.type, latest.desired_state_id,
           latest.release_version, latest.reason_code
    FROM ingest_heartbeats_e heartbeat
    FULL JOIN (
        SELECT DISTINCT ON (vehicle_id) vehicle_id, epoch, seq, type, desired_state_id,
               release_version, reason_code
        FROM ingest_events_e ORDER BY vehicle_id, epoch DESC, seq DESC, event_id
    ) latest ON latest.vehicle_id = heartbeat.vehicle_id
"""


async def staging_connection(session: AsyncSession) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under the session (same transaction), for binary COPY, with
    the staging tables on it. Whether they exist is asked each group (one catalog lookup), not
    remembered: tables created in a transaction that was then rolled back (a retried group,
    a refused one) are gone, and a flag on the connection would still say they are there."""
    driver = await session_driver(session)
    cur = await driver.execute("SELECT to_regclass('pg_temp.ingest_locked_e') IS NULL")
    missing = await cur.fetchone()
    if missing and missing[0]:
        for ddl in _STAGING_TABLES:
            await driver.execute(ddl)
    return driver


async def _copy(
    driver: psycopg.AsyncConnection[Any],
    table: str,
    types: list[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    async with driver.cursor() as cur:
        async with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                await copy.write_row(row)


async def stage(group: Group) -> None:
    """COPY the group's merged heartbeats and events; then one row per vehicle touched."""
    driver = group.driver
    if group.heartbeats:
        await _copy(
            driver,
            "ingest_heartbeats_e",
            _HEARTBEAT_TYPES,
            [
                (v, at, received, h.battery_percent, h.stationary, h.actual_release_version)
                for v, (h, at, received) in group.heartbeats.items()
            ],
        )
    if group.events:
        await _copy(
            driver,
            "ingest_events_e",
            _EVENT_TYPES,
            [
                (
                    e.vehicle_id,
                    e.event_id,
                    e.epoch,
                    e.seq,
                    e.type.value,
                    e.occurred_at,
                    e.desired_state_id,
                    e.release_version,
                    e.reason_code,
                    to_json(e.details).decode() if e.details else "{}",
                )
                for e in group.events
            ],
        )
    await driver.execute(_TOUCHED)
