"""Lock (in id order) and read the wide `vehicles` rows of the vehicles with events, and of
those flagged by their heartbeat. Locked, so two groups naming the same vehicle (another
ingest process) derive one after the other, each from what the other wrote.

The values read under the lock stay in PostgreSQL: the locking statement itself stages the
rows to derive (`ingest_locked_e`, with their address) for the wide update (derive.py). What
comes back to Python is what the pure `derive_status` needs, as `LockedRow`s."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import RowMaker

from services.telemetry.clock import clock_milliseconds, seq_jump_too_far
from services.telemetry.group import Group, GroupRequest, LockedRow, SeqJumped, UnknownVehicle


def _locked_row(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[LockedRow]:
    return LockedRow._make


# A new latest event: a greater (epoch, seq) than the vehicle's stored one (`news.newer`).
_LOCK = """
    WITH locked AS (
        SELECT v.id AS vehicle_id,
               news.newer OR touched.vehicle_id = ANY(%(flagged)s) AS derive,
               greatest(narrow.last_seen_at, v.last_seen_at) AS last_seen_at,
               CASE WHEN narrow.vehicle_id IS NULL THEN v.battery_percent
                    ELSE narrow.battery_percent END AS battery_percent,
               CASE WHEN narrow.vehicle_id IS NULL THEN v.stationary
                    ELSE narrow.stationary END AS stationary,
               coalesce(narrow.actual_release_version, v.actual_release_version)
                   AS actual_release_version,
               CASE WHEN news.newer THEN touched.event_seq
                    ELSE v.last_event_seq END AS last_event_seq,
               CASE WHEN news.newer THEN touched.event_epoch
                    ELSE v.last_event_epoch END AS last_event_epoch,
               CASE WHEN news.newer THEN touched.event_type
                    ELSE v.last_event_type END AS last_event_type,
               CASE WHEN news.newer THEN touched.event_desired_state_id
                    ELSE v.last_event_desired_state_id END AS last_event_desired_state_id,
               CASE WHEN news.newer THEN touched.event_release_version
                    ELSE v.last_event_release_version END AS last_event_release_version,
               CASE WHEN news.newer THEN touched.event_reason_code
                    ELSE v.last_event_reason_code END AS last_event_reason_code,
               v.status, v.reason_codes, v.desired_release_version, v.desired_state_id,
               v.rollout_id, v.created_at, v.ctid AS row_address,
               v.last_event_seq AS stored_seq, v.last_event_epoch AS stored_epoch
        FROM ingest_touched_e touched
        JOIN vehicles v ON v.id = touched.vehicle_id
        CROSS JOIN LATERAL (
            SELECT (touched.event_epoch, touched.event_seq)
                   > (v.last_event_epoch, v.last_event_seq) AS newer
        ) news
        LEFT JOIN vehicle_telemetry narrow ON narrow.vehicle_id = touched.vehicle_id
        WHERE touched.event_seq >= 0 OR touched.vehicle_id = ANY(%(flagged)s)
        ORDER BY v.id
        FOR NO KEY UPDATE OF v
    ),
    staged AS (
        INSERT INTO ingest_locked_e (vehicle_id, last_seen_at, battery_percent, stationary,
                                     actual_release_version, last_event_epoch,
                                     last_event_seq, last_event_type,
                                     last_event_desired_state_id, last_event_release_version,
                                     last_event_reason_code, row_address)
        SELECT vehicle_id, last_seen_at, battery_percent, stationary, actual_release_version,
               last_event_epoch, last_event_seq, last_event_type, last_event_desired_state_id,
               last_event_release_version, last_event_reason_code, row_address
        FROM locked WHERE derive
    )
    SELECT vehicle_id, derive, last_seen_at, actual_release_version, last_event_seq,
           last_event_epoch, last_event_type, last_event_desired_state_id::text,
           last_event_release_version, last_event_reason_code, status, reason_codes,
           desired_release_version, desired_state_id::text, rollout_id, created_at,
           stored_seq, stored_epoch
    FROM locked
"""


async def lock_wide_rows(group: Group) -> None:
    """Lock and read the rows; keep the stored (epoch, seq) of each (events.py) and the rows
    to derive (derive.py): those with a new latest event (a late event enters the timeline
    but moves nothing) and the flagged ones. Counting the vehicles with events is their
    existence check. A new latest event whose `seq` jumps too far (clock.py) redoes the group
    without the requests holding such events (`SeqJumped`)."""
    if not group.latest and not group.flagged:
        return
    async with group.driver.cursor(row_factory=_locked_row) as cur:
        await cur.execute(_LOCK, {"flagged": group.flagged}, binary=True)
        rows = await cur.fetchall()
    latest = group.latest
    stored = group.stored
    to_derive = group.to_derive
    max_jump = group.policy.max_seq_jump
    clock_ms = clock_milliseconds(group.now)
    with_events = 0
    jumped = False
    for row in rows:
        stored[row.vehicle_id] = (row.stored_epoch, row.stored_seq)
        new = latest.get(row.vehicle_id)
        if new is not None:
            with_events += 1
            # Only the vehicle's greatest new event can be too far: the others are below it.
            if row.derive and seq_jump_too_far(
                stored_epoch=row.stored_epoch,
                stored_seq=row.stored_seq,
                epoch=new.epoch,
                seq=new.seq,
                max_jump=max_jump,
                clock_ms=clock_ms,
            ):
                jumped = True
        if row.derive:
            to_derive.append(row)
    if with_events < len(latest):  # some vehicle is unknown: refuse its requests, redo
        raise UnknownVehicle
    if jumped:
        raise SeqJumped(stored)


def refuse_jumps(
    requests: list[GroupRequest],
    stored: dict[str, tuple[int, int]],
    max_jump: int,
    now: datetime,
) -> int:
    """Mark invalid (whole) each live request holding an event whose `seq` jumps too far past
    its vehicle's newest stored (epoch, seq); returns how many were marked."""
    marked = 0
    clock_ms = clock_milliseconds(now)
    for req in requests:
        if req.invalid is not None or req.refused is not None:
            continue
        details: list[dict[str, Any]] = []
        for index, ev in enumerate(req.batch.events):
            newest = stored.get(ev.vehicle_id)
            if newest is not None and seq_jump_too_far(
                stored_epoch=newest[0],
                stored_seq=newest[1],
                epoch=ev.epoch,
                seq=ev.seq,
                max_jump=max_jump,
                clock_ms=clock_ms,
            ):
                details.append(
                    {
                        "field": f"events.{index}.seq",
                        "index": index,
                        "message": f"more than {max_jump} past the vehicle's newest seq in "
                        f"epoch {ev.epoch} ({newest[1] if ev.epoch == newest[0] else 0}) "
                        "and past the server's clock in milliseconds",
                        "code": "seq_jump",
                    }
                )
        if details:
            req.invalid = details
            marked += 1
    return marked
