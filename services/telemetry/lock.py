"""Lock (in id order) and read the wide `vehicles` rows of the vehicles with events, and of
those flagged by their heartbeat. Locked, so two groups naming the same vehicle (another
ingest process) derive one after the other, each from what the other wrote.

The values read under the lock stay in PostgreSQL: the locking statement itself stages the
rows to derive (`ingest_wide`, with their address) for the wide update (derive.py). What
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
        SELECT v.id,
               u.seq > v.last_event_seq OR u.vid = ANY(%(flagged)s) AS derive,
               greatest(t.last_seen_at, v.last_seen_at) AS seen,
               CASE WHEN t.vehicle_id IS NULL THEN v.battery_percent
                    ELSE t.battery_percent END AS battery,
               CASE WHEN t.vehicle_id IS NULL THEN v.stationary
                    ELSE t.stationary END AS stationary,
               coalesce(t.actual_release_version, v.actual_release_version) AS actual,
               greatest(u.seq, v.last_event_seq) AS seq,
               CASE WHEN u.seq > v.last_event_seq THEN u.typ
                    ELSE v.last_event_type END AS typ,
               CASE WHEN u.seq > v.last_event_seq THEN u.ds
                    ELSE v.last_event_desired_state_id END AS eds,
               CASE WHEN u.seq > v.last_event_seq THEN u.rel
                    ELSE v.last_event_release_version END AS rel,
               CASE WHEN u.seq > v.last_event_seq THEN u.reason
                    ELSE v.last_event_reason_code END AS reason,
               v.status, v.reason_codes, v.desired_release_version, v.desired_state_id,
               v.rollout_id, v.created_at, v.ctid AS tid, v.last_event_seq AS stored_seq
        FROM ingest_touch u
        JOIN vehicles v ON v.id = u.vid
        LEFT JOIN vehicle_telemetry t ON t.vehicle_id = u.vid
        WHERE u.seq >= 0 OR u.vid = ANY(%(flagged)s)
        ORDER BY v.id
        FOR NO KEY UPDATE OF v
    ),
    kept AS (
        INSERT INTO ingest_wide (id, seen, battery, stationary, actual, seq, typ, eds,
                                 rel, reason, tid)
        SELECT id, seen, battery, stationary, actual, seq, typ, eds, rel, reason, tid
        FROM locked WHERE derive
    )
    SELECT id, derive, seen, actual, seq, typ, eds::text, rel, reason, status,
           reason_codes, desired_release_version, desired_state_id::text, rollout_id,
           created_at, stored_seq
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
