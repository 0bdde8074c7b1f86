"""Lock (in id order) and read the wide `vehicles` rows of the vehicles with events, and of
those flagged by their heartbeat. Locked, so two groups naming the same vehicle (another
ingest process) derive one after the other, each from what the other wrote.

The values read under the lock stay in PostgreSQL: the locking statement itself stages the
rows to derive (`ingest_locked`, with their address) for the wide update (derive.py). What
comes back to Python is what the pure `derive_status` needs, as `LockedRow`s."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import RowMaker

from services.telemetry.group import Group, LockedRow, UnknownVehicle


def _locked_row(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[LockedRow]:
    return LockedRow._make


_LOCK = """
    WITH locked AS (
        SELECT v.id AS vehicle_id,
               touched.event_seq > v.last_event_seq
                   OR touched.vehicle_id = ANY(%(flagged)s) AS derive,
               greatest(narrow.last_seen_at, v.last_seen_at) AS last_seen_at,
               CASE WHEN narrow.vehicle_id IS NULL THEN v.battery_percent
                    ELSE narrow.battery_percent END AS battery_percent,
               CASE WHEN narrow.vehicle_id IS NULL THEN v.stationary
                    ELSE narrow.stationary END AS stationary,
               coalesce(narrow.actual_release_version, v.actual_release_version)
                   AS actual_release_version,
               greatest(touched.event_seq, v.last_event_seq) AS last_event_seq,
               CASE WHEN touched.event_seq > v.last_event_seq THEN touched.event_type
                    ELSE v.last_event_type END AS last_event_type,
               CASE WHEN touched.event_seq > v.last_event_seq
                    THEN touched.event_desired_state_id
                    ELSE v.last_event_desired_state_id END AS last_event_desired_state_id,
               CASE WHEN touched.event_seq > v.last_event_seq
                    THEN touched.event_release_version
                    ELSE v.last_event_release_version END AS last_event_release_version,
               CASE WHEN touched.event_seq > v.last_event_seq THEN touched.event_reason_code
                    ELSE v.last_event_reason_code END AS last_event_reason_code,
               v.status, v.reason_codes, v.desired_release_version, v.desired_state_id,
               v.rollout_id, v.created_at, v.ctid AS row_address,
               v.last_event_seq AS stored_seq
        FROM ingest_touched touched
        JOIN vehicles v ON v.id = touched.vehicle_id
        LEFT JOIN vehicle_telemetry narrow ON narrow.vehicle_id = touched.vehicle_id
        WHERE touched.event_seq >= 0 OR touched.vehicle_id = ANY(%(flagged)s)
        ORDER BY v.id
        FOR NO KEY UPDATE OF v
    ),
    staged AS (
        INSERT INTO ingest_locked (vehicle_id, last_seen_at, battery_percent, stationary,
                                   actual_release_version, last_event_seq, last_event_type,
                                   last_event_desired_state_id, last_event_release_version,
                                   last_event_reason_code, row_address)
        SELECT vehicle_id, last_seen_at, battery_percent, stationary, actual_release_version,
               last_event_seq, last_event_type, last_event_desired_state_id,
               last_event_release_version, last_event_reason_code, row_address
        FROM locked WHERE derive
    )
    SELECT vehicle_id, derive, last_seen_at, actual_release_version, last_event_seq,
           last_event_type, last_event_desired_state_id::text, last_event_release_version,
           last_event_reason_code, status, reason_codes, desired_release_version,
           desired_state_id::text, rollout_id, created_at, stored_seq
    FROM locked
"""


async def lock_wide_rows(group: Group) -> None:
    """Lock and read the rows; keep the stored seq of each (events.py) and the rows to
    derive (derive.py): those with a new latest event (a late event enters the timeline but
    moves nothing) and the flagged ones. Counting the vehicles with events is their
    existence check."""
    if not group.latest and not group.flagged:
        return
    async with group.driver.cursor(row_factory=_locked_row) as cur:
        await cur.execute(_LOCK, {"flagged": group.flagged}, binary=True)
        rows = await cur.fetchall()
    latest = group.latest
    stored_seq = group.stored_seq
    to_derive = group.to_derive
    with_events = 0
    for row in rows:
        stored_seq[row.vehicle_id] = row.stored_seq
        with_events += row.vehicle_id in latest
        if row.derive:
            to_derive.append(row)
    if with_events < len(latest):  # some vehicle is unknown: refuse its requests, redo
        raise UnknownVehicle
