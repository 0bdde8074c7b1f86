"""Heartbeats, two steps: first the narrow `vehicle_telemetry` rows (every heartbeat, a HOT
update), then, once the events are in, the wide `vehicles` rows of the vehicles whose
heartbeat changed something visible but cannot change their status (docs/data-model.md)."""

from __future__ import annotations

from datetime import timedelta

from services.telemetry.group import Group, UnknownVehicle

# lastSeenAt is the server's receive time (the latest wins); the values are those of the
# heartbeat with the latest `heartbeat_at` (its `sentAt` capped at its arrival, clock.py): a
# late delivery refreshes lastSeenAt only. A first narrow row takes the heartbeat's values
# over what the wide row knew (its fields left out keep the wide row's). Returns how many
# vehicles it matched and the flagged ones (see upsert_narrow_rows).
_UPSERT_NARROW = """
    WITH upserted AS (
        INSERT INTO vehicle_telemetry AS stored (vehicle_id, last_seen_at, heartbeat_at,
            battery_percent, stationary, actual_release_version)
        SELECT touched.vehicle_id, greatest(touched.received_at, v.last_seen_at),
               touched.heartbeat_at,
               coalesce(touched.battery_percent, v.battery_percent),
               coalesce(touched.stationary, v.stationary),
               coalesce(touched.actual_release_version, v.actual_release_version)
        FROM ingest_touched_e touched JOIN vehicles v ON v.id = touched.vehicle_id
        WHERE touched.has_heartbeat
        ORDER BY touched.vehicle_id
        ON CONFLICT (vehicle_id) DO UPDATE SET
            last_seen_at = greatest(EXCLUDED.last_seen_at, stored.last_seen_at),
            heartbeat_at = CASE
                WHEN EXCLUDED.heartbeat_at >= coalesce(stored.heartbeat_at, '-infinity')
                THEN EXCLUDED.heartbeat_at ELSE stored.heartbeat_at END,
            battery_percent = CASE
                WHEN EXCLUDED.heartbeat_at >= coalesce(stored.heartbeat_at, '-infinity')
                THEN EXCLUDED.battery_percent ELSE stored.battery_percent END,
            stationary = CASE
                WHEN EXCLUDED.heartbeat_at >= coalesce(stored.heartbeat_at, '-infinity')
                THEN EXCLUDED.stationary ELSE stored.stationary END,
            actual_release_version = CASE
                WHEN EXCLUDED.heartbeat_at >= coalesce(stored.heartbeat_at, '-infinity')
                THEN EXCLUDED.actual_release_version ELSE stored.actual_release_version END
        RETURNING stored.vehicle_id, stored.actual_release_version
    )
    SELECT count(*),
           coalesce(array_agg(upserted.vehicle_id) FILTER (
               WHERE v.status = 'offline'
                  OR upserted.actual_release_version IS DISTINCT FROM v.actual_release_version
           ), '{}')
    FROM upserted JOIN vehicles v ON v.id = upserted.vehicle_id
"""

_REFRESH_WIDE = """
    UPDATE vehicles v
    SET last_seen_at = narrow.last_seen_at, battery_percent = narrow.battery_percent,
        stationary = narrow.stationary
    FROM ingest_touched_e touched
    JOIN vehicle_telemetry narrow ON narrow.vehicle_id = touched.vehicle_id
    WHERE v.id = touched.vehicle_id AND touched.has_heartbeat
      -- not the rows locked for derivation (a new latest event, or flagged): the wide
      -- update of derive.py writes those, by the address the lock read them at
      AND (touched.event_epoch, touched.event_seq) <= (v.last_event_epoch, v.last_event_seq)
      AND NOT touched.vehicle_id = ANY(%(flagged)s)
      AND v.status <> 'offline'
      AND coalesce(narrow.actual_release_version, v.actual_release_version)
          IS NOT DISTINCT FROM v.actual_release_version
      AND (v.status = 'blocked'
           OR narrow.stationary IS DISTINCT FROM v.stationary
           OR (narrow.battery_percent IS NULL) <> (v.battery_percent IS NULL)
           OR abs(narrow.battery_percent - v.battery_percent) >= %(step)s
           OR (narrow.last_seen_at IS NOT NULL AND (v.last_seen_at IS NULL
               OR narrow.last_seen_at - v.last_seen_at >= %(refresh)s)))
"""


async def upsert_narrow_rows(group: Group) -> None:
    """Upsert the narrow row of every vehicle with a heartbeat (a HOT update when the row
    exists). Counted: the optimistic pass's existence check. Flagged when the status may
    change: an offline vehicle heard again, or a new actual release. For the others it
    cannot."""
    if not group.heartbeats:
        return
    cur = await group.driver.execute(_UPSERT_NARROW)
    matched = await cur.fetchone()
    assert matched is not None
    known, group.flagged = int(matched[0]), list(matched[1])
    if known < len(group.heartbeats):  # some vehicle is unknown: refuse its requests, redo
        raise UnknownVehicle


async def refresh_wide_rows(group: Group) -> None:
    """The visible heartbeat values (stationary, battery by `battery_step` points, a blocked
    vehicle's, a `lastSeenAt` older than `refresh_seconds`) of the vehicles not locked for
    derivation go to their wide row in one statement, without a trip through Python. Their
    status cannot change: it depends on none of these unless the vehicle is offline."""
    cur = await group.driver.execute(
        _REFRESH_WIDE,
        {
            "step": group.policy.battery_step,
            "refresh": timedelta(seconds=group.policy.refresh_seconds),
            "flagged": group.flagged,
        },
    )
    group.result.vehicles_written += max(cur.rowcount, 0)
