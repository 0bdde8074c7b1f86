"""The status of each locked vehicle with a new latest event (or flagged), derived in Python by
the pure `derive_status`, and its wide row written back with its latest event in one statement.

Only the verdicts (status, reason codes, changed) go back to PostgreSQL, as one JSON
parameter; the rest of what is written was staged by the locking statement (lock.py). A
trigger on `vehicles` moves the `(status, id)` key of each vehicle whose status changed
(`vehicles_by_status`, migration 0011) in the same statement, and the status changes go to
the change feed as `vehicle.updated` rows of up to `VEHICLE_DELTAS_PER_ROW` vehicles."""

from __future__ import annotations

from datetime import timedelta

from pydantic_core import to_json

from services import change_feed
from services.telemetry.group import Group, RowMoved
from services.vehicle_status import LatestEvent, derive_status

# The status changes of a group's wide-row update (`written`), as change-feed deltas.
_STATUS_DELTAS = change_feed.vehicle_deltas_sql(
    "(SELECT * FROM written WHERE written.changed)",
    "'status', s.status, 'reasonCodes', to_jsonb(s.reason_codes)",
)
_WRITE_DERIVED = f"""
    WITH written AS (
        UPDATE vehicles v
        SET status = verdict.status, reason_codes = verdict.codes,
            -- lastSeenAt only by the refresh interval (as for plain heartbeats):
            -- it feeds an index, so leaving it alone keeps a status change a
            -- heap-only update (status itself has no index, migration 0003).
            last_seen_at = CASE
                WHEN locked.last_seen_at IS NOT NULL
                     AND (v.last_seen_at IS NULL OR v.status = 'offline'
                          OR locked.last_seen_at - v.last_seen_at >= %(refresh)s)
                THEN locked.last_seen_at ELSE v.last_seen_at END,
            battery_percent = locked.battery_percent,
            stationary = locked.stationary,
            actual_release_version = locked.actual_release_version,
            last_event_seq = locked.last_event_seq,
            last_event_epoch = locked.last_event_epoch,
            last_event_type = locked.last_event_type,
            last_event_desired_state_id = locked.last_event_desired_state_id,
            last_event_release_version = locked.last_event_release_version,
            last_event_reason_code = locked.last_event_reason_code,
            updated_at = CASE WHEN verdict.changed THEN now() ELSE v.updated_at END
        FROM ingest_locked_e locked
        JOIN json_to_recordset(%(verdicts)s::json)
             AS verdict(id text, status text, codes text[], changed boolean)
             ON verdict.id = locked.vehicle_id
        -- By the row's address, taken under the lock (it cannot move while the lock is
        -- held): one page read instead of an index descent per row. The id is checked as a
        -- filter (IS NOT DISTINCT FROM is not an equality the planner could turn into an
        -- index lookup from the verdicts instead).
        WHERE v.ctid = locked.row_address AND v.id IS NOT DISTINCT FROM locked.vehicle_id
        RETURNING v.id, v.status, v.reason_codes, v.region, v.model, v.org, verdict.changed
    ),
    feed AS ({_STATUS_DELTAS})
    SELECT count(*) FROM written
"""


def derive_statuses(group: Group) -> None:
    """One verdict per row to derive: its status and reason codes, and whether they changed.
    The rows of vehicles in a rollout are kept for the outcomes (outcomes.py)."""
    now = group.now
    offline_after_seconds = group.policy.offline_after_seconds
    verdicts = group.verdicts
    in_rollouts = group.in_rollouts
    for row in group.to_derive:
        event_type = row.last_event_type
        derived = derive_status(
            desired_release=row.desired_release_version,
            desired_state_id=row.desired_state_id,
            actual_release=row.actual_release_version,
            latest_event=LatestEvent(
                type=event_type,
                desired_state_id=row.last_event_desired_state_id,
                release_version=row.last_event_release_version,
                reason_code=row.last_event_reason_code,
            )
            if event_type
            else None,
            last_seen_at=row.last_seen_at,
            registered_at=row.created_at,
            now=now,
            offline_after_seconds=offline_after_seconds,
        )
        codes = list(derived.reason_codes)
        changed = derived.status != row.status or codes != list(row.reason_codes or [])
        verdicts.append(
            {"id": row.vehicle_id, "status": derived.status, "codes": codes, "changed": changed}
        )
        if row.rollout_id is not None:
            in_rollouts.append(row)


async def write_derived_rows(group: Group) -> None:
    """Write the derived rows back, each found by the address the lock read it at."""
    if not group.verdicts:
        return
    cur = await group.driver.execute(
        _WRITE_DERIVED,
        {
            "refresh": timedelta(seconds=group.policy.refresh_seconds),
            "verdicts": to_json(group.verdicts).decode(),
        },
    )
    one = await cur.fetchone()
    written = int(one[0]) if one else 0
    if written < len(group.verdicts):
        raise RowMoved
    group.result.vehicles_written += written
