"""Every SQL statement of telemetry ingestion: one group of requests written in one transaction.

A group is the merge of many concurrent `POST /telemetry` requests (see services/ingest.py).
`write_group` does, set-based and in a fixed lock order (telemetry rows, then vehicles, then
rollout targets, each sorted by vehicle id):

1. Resolves the vehicles named by the group (existence and the caller's scope); a request
   naming an unknown or out-of-scope vehicle is refused whole and nothing of it is written.
2. Inserts the events (staged by binary COPY) with one `INSERT … SELECT`, `ON CONFLICT DO
   NOTHING` on the primary key (vehicle_id, event_id): what it wrote was new, the rest are
   duplicates.
3. Upserts the narrow `vehicle_telemetry` row of every vehicle with a heartbeat in the group
   (the latest heartbeat wins, by `sentAt`). Events do not write it.
4. Locks (`FOR NO KEY UPDATE`, in id order) the wide `vehicles` rows whose status may change:
   an event with a higher `seq` than the stored latest one (a late event enters the timeline
   but moves nothing), an offline vehicle heard again, a new actual release. Derives their
   status with the pure `derive_status` and rewrites them with their latest event (migration
   0008: the latest event lives on the wide row). Other heartbeats reach the wide row only when
   something visible changed: stationary, battery by `battery_step` points or more, last seen
   by `refresh_seconds` or more. Status changes go to the change feed: one `vehicle.updated`
   row per group (per `VEHICLE_DELTAS_PER_ROW` vehicles) listing the vehicles' deltas.
5. Feeds rollout outcomes through `record_target_outcomes`: the latest event of a vehicle,
   when it is about its rollout target's own desired state.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from pydantic_core import to_json
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import session_driver
from models.enums import EventType
from models.scope import Scope
from models.telemetry import EventIn, HeartbeatIn, TelemetryBatch
from services import change_feed
from services.rollouts.outcomes import record_target_outcomes
from services.scope import allows_vehicle
from services.vehicle_status import LatestEvent, derive_status

OUTCOME_OF_EVENT = {
    EventType.DESIRED_NOTIFIED: "updating",
    EventType.APPLY_START: "updating",
    EventType.READY: "succeeded",
    EventType.FAILED: "failed",
    EventType.BLOCKED: "blocked",
}


@dataclass(frozen=True)
class WideWritePolicy:
    """When the wide `vehicles` row is rewritten for a heartbeat (docs/data-model.md)."""

    offline_after_seconds: int = 300
    refresh_seconds: int = 240
    battery_step: int = 5


@dataclass
class GroupRequest:
    """One request inside a group, and what the group did for it."""

    batch: TelemetryBatch
    scope: Scope
    accepted: int = 0
    duplicates: int = 0
    refused: list[dict[str, Any]] | None = None  # NOT_FOUND details when refused


@dataclass
class GroupResult:
    events_inserted: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    vehicles_written: int = 0
    outcomes: int = 0
    refused_requests: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def _merge(
    live: list[GroupRequest],
) -> tuple[
    dict[tuple[str, uuid.UUID], GroupRequest],
    list[EventIn],
    dict[str, HeartbeatIn],
    dict[str, EventIn],
]:
    """The group as one batch: events deduplicated (first wins), the newest heartbeat and
    the highest-`seq` event per vehicle (ties: the lowest `eventId`, as the SQL that stages
    the group picks it). (An event already stored cannot be the vehicle's new latest: its seq
    was merged when it was stored, in the same transaction.)"""
    owner: dict[tuple[str, uuid.UUID], GroupRequest] = {}
    events: list[EventIn] = []
    beats: dict[str, HeartbeatIn] = {}
    top: dict[str, EventIn] = {}
    for req in live:
        req.accepted = req.duplicates = 0
        for ev in req.batch.events:
            key = (ev.vehicle_id, ev.event_id)
            if key in owner:
                req.duplicates += 1
                continue
            owner[key] = req
            events.append(ev)
            best = top.get(ev.vehicle_id)
            if (
                best is None
                or ev.seq > best.seq
                or (ev.seq == best.seq and ev.event_id < best.event_id)
            ):
                top[ev.vehicle_id] = ev
        for hb in req.batch.heartbeats:
            seen = beats.get(hb.vehicle_id)
            if seen is None or hb.sent_at >= seen.sent_at:
                beats[hb.vehicle_id] = hb
    return owner, events, beats, top


class _Redo(Exception):
    """Roll the group back and write it again, checked."""


class _UnknownVehicle(_Redo):
    """The optimistic pass found a vehicle it could not resolve."""


class _RowMoved(_Redo):
    """A locked wide row was not where the lock found it. Only this transaction can move a
    row it holds locked, and the heartbeat refresh leaves those rows to the wide update
    (test_a_vehicle_both_derived_and_refreshed_in_one_group_is_written_once): guarded all
    the same, so a miss rewrites the group instead of losing a status."""


async def _refuse(driver: Any, requests: list[GroupRequest]) -> bool:
    """Mark refused (whole) each request naming a vehicle that is unknown or outside its
    caller's scope (region, model, org). Returns whether any request was refused."""
    wanted = sorted(
        {h.vehicle_id for r in requests for h in r.batch.heartbeats}
        | {e.vehicle_id for r in requests for e in r.batch.events}
    )
    cur = await driver.execute(
        "SELECT id, region, model, org FROM vehicles WHERE id = ANY(%s)", (wanted,)
    )
    places = {row[0]: row for row in await cur.fetchall()}
    refused_any = False
    for req in requests:
        if req.refused is not None:
            continue
        details: list[dict[str, Any]] = []
        named: list[tuple[str, Sequence[HeartbeatIn | EventIn]]] = [
            ("heartbeats", req.batch.heartbeats),
            ("events", req.batch.events),
        ]
        for kind, items in named:
            for index, item in enumerate(items):
                place = places.get(item.vehicle_id)
                if place is None or not allows_vehicle(
                    req.scope, region=place[1], model=place[2], org=place[3]
                ):
                    details.append(
                        {
                            "field": f"{kind}.{index}.vehicleId",
                            "index": index,
                            "message": f"vehicle {item.vehicle_id!r} not found",
                        }
                    )
                    if len(details) >= 20:
                        break
        if details:
            req.refused = details
            refused_any = True
    return refused_any


_STAGING = (
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_events (
        vehicle_id text, event_id uuid, seq bigint, type text, occurred_at timestamptz,
        desired_state_id uuid, release_version text, reason_code text, details text
    ) ON COMMIT DELETE ROWS
    """,
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_beats (
        vid text, seen timestamptz, battery smallint, stationary boolean, actual text
    ) ON COMMIT DELETE ROWS
    """,
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_touch (
        vid text, has_hb boolean, seen timestamptz, battery smallint, stationary boolean,
        actual text, seq bigint, typ text, ds uuid, rel text, reason text
    ) ON COMMIT DELETE ROWS
    """,
    """
    CREATE TEMP TABLE IF NOT EXISTS ingest_wide (
        id text, seen timestamptz, battery smallint, stationary boolean, actual text,
        seq bigint, typ text, eds uuid, rel text, reason text, tid tid
    ) ON COMMIT DELETE ROWS
    """,
)
# `details` is staged as JSON text, encoded by pydantic_core (and not at all when empty,
# the common case), and parsed once by PostgreSQL when it moves to the timeline.
_EVENT_TYPES = ["text", "uuid", "int8", "text", "timestamptz", "uuid", "text", "text", "text"]
_INSERT_STAGED_EVENTS = """
    INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at, desired_state_id,
                                 release_version, reason_code, details)
    SELECT vehicle_id, event_id, seq, type, occurred_at, desired_state_id, release_version,
           reason_code, details::jsonb
    FROM ingest_events
"""
_BEAT_TYPES = ["text", "timestamptz", "int2", "bool", "text"]
# The status changes of a group's wide-row update (`w`), as change-feed deltas.
_STATUS_DELTAS = change_feed.vehicle_deltas_sql(
    "(SELECT * FROM w WHERE w.changed)",
    "'status', s.status, 'reasonCodes', to_jsonb(s.reason_codes)",
)


async def _driver(session: AsyncSession) -> Any:
    """The psycopg connection under the session (same transaction), for binary COPY, with
    the staging tables on it. Whether they exist is asked each group (one catalog lookup), not
    remembered: tables created in a transaction that was then rolled back (a retried group,
    a refused one) are gone, and a flag on the connection would still say they are there."""
    driver = await session_driver(session)
    cur = await driver.execute("SELECT to_regclass('pg_temp.ingest_wide') IS NULL")
    missing = await cur.fetchone()
    if missing and missing[0]:
        for ddl in _STAGING:
            await driver.execute(ddl)
    return driver


async def _copy(driver: Any, table: str, types: list[str], rows: Sequence[Sequence[Any]]) -> None:
    async with driver.cursor() as cur:
        async with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                await copy.write_row(row)


async def _insert_new_events(
    driver: Any, events: list[EventIn], stored_seq: dict[str, int]
) -> bool:
    """The common case, cheaper: when every event of the group is newer (by `seq`) than the
    newest stored for its vehicle (read under the lock), none can be a duplicate of a vehicle
    that numbers its events as SPEC.md says, so they go in with a plain INSERT: the unique
    index checks each key while inserting it, where `ON CONFLICT` first probes the index
    for every row and then inserts (perf: that probe was an eighth of PostgreSQL's time).
    Inside a savepoint: a duplicate all the same (an event id reused under a new seq) rolls
    back to it and the caller inserts with `ON CONFLICT`. Returns whether it inserted."""
    lowest: dict[str, int] = {}
    for ev in events:
        seen = lowest.get(ev.vehicle_id)
        if seen is None or ev.seq < seen:
            lowest[ev.vehicle_id] = ev.seq
    if any(seq <= stored_seq.get(vid, 0) for vid, seq in lowest.items()):
        return False
    await driver.execute("SAVEPOINT ingest_events")
    try:
        await driver.execute(_INSERT_STAGED_EVENTS)
    except psycopg.errors.UniqueViolation:
        await driver.execute("ROLLBACK TO SAVEPOINT ingest_events")
        await driver.execute("RELEASE SAVEPOINT ingest_events")
        return False
    await driver.execute("RELEASE SAVEPOINT ingest_events")
    return True


async def write_group(
    session: AsyncSession,
    *,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime | None = None,
) -> GroupResult:
    """Write one group (the caller commits). Fills each request's accepted/duplicates/refused.

    Bulk data goes in by binary COPY into session-local staging tables (emptied at commit),
    then moves with set-based statements: no row-by-row statement, no per-value text
    escaping in Python. Groups of unrestricted callers naming only known vehicles (the
    common case) are written optimistically, without a separate existence check: the narrow
    upsert joins `vehicles` and counts what it matched; a shortfall rolls the transaction
    back and writes the group again after refusing the requests that name unknown
    vehicles."""
    now = now or datetime.now(UTC)
    checked = any(not r.scope.unrestricted for r in requests)
    if not checked:
        try:
            return await _write_group(session, requests, policy, now, checked=False)
        except _Redo:
            await session.rollback()
    return await _write_group(session, requests, policy, now, checked=True)


async def _write_group(
    session: AsyncSession,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime,
    *,
    checked: bool,
) -> GroupResult:
    result = GroupResult()
    clock = time.perf_counter()
    cpu = time.process_time()

    def lap(name: str) -> None:
        """Time since the last lap (`name`) and this process's CPU in it (`name_cpu`): the
        difference is time spent waiting for PostgreSQL (debug log of each group)."""
        nonlocal clock, cpu
        t = time.perf_counter()
        c = time.process_time()
        result.stats[name] = result.stats.get(name, 0.0) + t - clock
        result.stats[f"{name}_cpu"] = result.stats.get(f"{name}_cpu", 0.0) + c - cpu
        clock = t
        cpu = c

    for req in requests:  # a retried group starts from nothing
        req.accepted = req.duplicates = 0
        req.refused = None
    driver = await _driver(session)
    live = list(requests)
    if checked and await _refuse(driver, live):
        live = [r for r in live if r.refused is None]
        result.refused_requests = len(requests) - len(live)
    owner, events, beats, top = _merge(live)
    if not beats and not top:
        return result
    if beats:
        await _copy(
            driver,
            "ingest_beats",
            _BEAT_TYPES,
            [
                (v, h.sent_at, h.battery_percent, h.stationary, h.actual_release_version)
                for v, h in beats.items()
            ],
        )
    if events:
        await _copy(
            driver,
            "ingest_events",
            _EVENT_TYPES,
            [
                (
                    e.vehicle_id,
                    e.event_id,
                    e.seq,
                    e.type.value,
                    e.occurred_at,
                    e.desired_state_id,
                    e.release_version,
                    e.reason_code,
                    to_json(e.details).decode() if e.details else "{}",
                )
                for e in events
            ],
        )
    # One row per vehicle touched: its newest heartbeat and its highest-seq event.
    await driver.execute(
        """
        INSERT INTO ingest_touch
        SELECT coalesce(b.vid, e.vehicle_id), b.vid IS NOT NULL, b.seen, b.battery,
               b.stationary, b.actual, coalesce(e.seq, -1), e.type, e.desired_state_id,
               e.release_version, e.reason_code
        FROM ingest_beats b
        FULL JOIN (
            SELECT DISTINCT ON (vehicle_id) vehicle_id, seq, type, desired_state_id,
                   release_version, reason_code
            FROM ingest_events ORDER BY vehicle_id, seq DESC, event_id
        ) e ON e.vehicle_id = b.vid
        """
    )
    lap("stage")

    # Heartbeats: upsert the narrow rows (a HOT update when the row exists). The latest
    # heartbeat wins by `sentAt`; a first row starts from what the wide row knew. Counted
    # (the optimistic pass's existence check) and flagged when the status may change: an
    # offline vehicle heard again, or a new actual release. For the others it cannot.
    hb_known = 0
    flagged: list[str] = []
    if beats:
        cur = await driver.execute(
            """
            WITH up AS (
                INSERT INTO vehicle_telemetry AS t (vehicle_id, last_seen_at, battery_percent,
                    stationary, actual_release_version)
                SELECT u.vid, greatest(u.seen, v.last_seen_at),
                       CASE WHEN u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.battery, v.battery_percent)
                            ELSE v.battery_percent END,
                       CASE WHEN u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.stationary, v.stationary)
                            ELSE v.stationary END,
                       CASE WHEN u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.actual, v.actual_release_version)
                            ELSE v.actual_release_version END
                FROM ingest_touch u JOIN vehicles v ON v.id = u.vid
                WHERE u.has_hb
                ORDER BY u.vid
                ON CONFLICT (vehicle_id) DO UPDATE SET
                    last_seen_at = CASE
                        WHEN EXCLUDED.last_seen_at > coalesce(t.last_seen_at, '-infinity')
                        THEN EXCLUDED.last_seen_at ELSE t.last_seen_at END,
                    battery_percent = CASE
                        WHEN EXCLUDED.last_seen_at > coalesce(t.last_seen_at, '-infinity')
                        THEN EXCLUDED.battery_percent ELSE t.battery_percent END,
                    stationary = CASE
                        WHEN EXCLUDED.last_seen_at > coalesce(t.last_seen_at, '-infinity')
                        THEN EXCLUDED.stationary ELSE t.stationary END,
                    actual_release_version = CASE
                        WHEN EXCLUDED.last_seen_at > coalesce(t.last_seen_at, '-infinity')
                        THEN EXCLUDED.actual_release_version ELSE t.actual_release_version END
                RETURNING t.vehicle_id, t.actual_release_version
            )
            SELECT count(*),
                   coalesce(array_agg(up.vehicle_id) FILTER (
                       WHERE v.status = 'offline'
                          OR up.actual_release_version IS DISTINCT FROM v.actual_release_version
                   ), '{}')
            FROM up JOIN vehicles v ON v.id = up.vehicle_id
            """
        )
        one = await cur.fetchone()
        assert one is not None
        hb_known, flagged = int(one[0]), list(one[1])
        if hb_known < len(beats):  # some vehicle is unknown: refuse its requests, redo
            raise _UnknownVehicle
    lap("telemetry")

    # Lock (in id order) and read the wide rows of the vehicles with events, and of those
    # flagged above. Locked, so two groups naming the same vehicle (another ingest process)
    # derive one after the other, each from what the other wrote. Derived below: the rows
    # with a new latest event (a late event enters the timeline but moves nothing) and the
    # flagged ones. Counting the vehicles with events is their existence check.
    # The values read under the lock stay in PostgreSQL (`ingest_wide`, the rows to derive):
    # what goes through Python is what the pure `derive_status` needs, and what comes back
    # is its verdict (status, reason codes, changed).
    rows: list[tuple[Any, ...]] = []
    stored_seq: dict[str, int] = {}
    if top or flagged:
        cur = await driver.execute(
            """
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
            """,
            {"flagged": flagged},
            binary=True,
        )
        with_events = 0
        for r in await cur.fetchall():
            stored_seq[r[0]] = r[-1]
            with_events += r[0] in top
            if r[1]:
                rows.append((r[0], *r[2:-1]))
        if with_events < len(top):  # some vehicle is unknown: refuse its requests, redo
            raise _UnknownVehicle
    lap("select")

    # -- events: one insert; duplicates found by the row count, and then by xmin ----------
    inserted: set[tuple[str, uuid.UUID]] = set()
    if events and await _insert_new_events(driver, events, stored_seq):
        inserted = set(owner)
    elif events:
        cur = await driver.execute(
            f"{_INSERT_STAGED_EVENTS} ON CONFLICT (vehicle_id, event_id) DO NOTHING"
        )
        if cur.rowcount == len(events):  # no duplicate at all
            inserted = set(owner)
        else:  # which ones this transaction wrote (the others were there already)
            cur = await driver.execute(
                """
                SELECT te.vehicle_id, te.event_id
                FROM ingest_events s
                JOIN timeline_events te
                  ON te.vehicle_id = s.vehicle_id AND te.event_id = s.event_id
                WHERE te.xmin::text = (pg_current_xact_id()::xid)::text
                """
            )
            inserted = {(r[0], r[1]) for r in await cur.fetchall()}
    lap("events")
    for key, req in owner.items():
        if key in inserted:
            req.accepted += 1
        else:
            req.duplicates += 1
    result.events_inserted = len(inserted)
    result.duplicates = sum(r.duplicates for r in live)
    result.heartbeats = len(beats)
    # The status of the others (not locked above) cannot change (it depends on none of
    # battery, stationary or last seen unless the vehicle is offline): their visible heartbeat
    # values go to the wide row in one statement, without a trip through Python.
    cur = await driver.execute(
        """
        UPDATE vehicles v
        SET last_seen_at = t.last_seen_at, battery_percent = t.battery_percent,
            stationary = t.stationary
        FROM ingest_touch u JOIN vehicle_telemetry t ON t.vehicle_id = u.vid
        WHERE v.id = u.vid AND u.has_hb
          -- not the rows locked for derivation above (a new latest event, or flagged): the
          -- wide update below writes those, by the address the lock read them at
          AND u.seq <= v.last_event_seq AND NOT u.vid = ANY(%(flagged)s)
          AND v.status <> 'offline'
          AND coalesce(t.actual_release_version, v.actual_release_version)
              IS NOT DISTINCT FROM v.actual_release_version
          AND (v.status = 'blocked'
               OR t.stationary IS DISTINCT FROM v.stationary
               OR (t.battery_percent IS NULL) <> (v.battery_percent IS NULL)
               OR abs(t.battery_percent - v.battery_percent) >= %(step)s
               OR (t.last_seen_at IS NOT NULL AND (v.last_seen_at IS NULL
                   OR t.last_seen_at - v.last_seen_at >= %(refresh)s)))
        """,
        {
            "step": policy.battery_step,
            "refresh": timedelta(seconds=policy.refresh_seconds),
            "flagged": flagged,
        },
    )
    result.vehicles_written += max(cur.rowcount, 0)
    lap("refresh")

    verdicts: list[dict[str, Any]] = []
    outcomes_by_rollout: dict[int, list[tuple[str, str, str | None, uuid.UUID]]] = defaultdict(list)
    for (
        vid,
        seen_at,
        actual,
        last_seq,
        ev_type,
        ev_ds,
        ev_rel,
        ev_reason,
        status,
        reason_codes,
        desired_release,
        desired_ds,
        rollout_id,
        created_at,
    ) in rows:
        derived = derive_status(
            desired_release=desired_release,
            desired_state_id=desired_ds,
            actual_release=actual,
            latest_event=LatestEvent(
                type=ev_type,
                desired_state_id=ev_ds,
                release_version=ev_rel,
                reason_code=ev_reason,
            )
            if ev_type
            else None,
            last_seen_at=seen_at,
            registered_at=created_at,
            now=now,
            offline_after_seconds=policy.offline_after_seconds,
        )
        codes = list(derived.reason_codes)
        changed = derived.status != status or codes != list(reason_codes or [])
        verdicts.append({"id": vid, "status": derived.status, "codes": codes, "changed": changed})
        latest_new = top.get(vid)
        if (
            latest_new is not None
            and (vid, latest_new.event_id) in inserted
            and last_seq == latest_new.seq
            and rollout_id is not None
            and latest_new.desired_state_id is not None
        ):
            outcomes_by_rollout[int(rollout_id)].append(
                (
                    vid,
                    OUTCOME_OF_EVENT[latest_new.type],
                    latest_new.reason_code,
                    latest_new.desired_state_id,
                )
            )
    lap("derive")

    if verdicts:
        cur = await driver.execute(
            f"""
            WITH w AS (
                UPDATE vehicles v
                SET status = d.status, reason_codes = d.codes,
                    -- lastSeenAt only by the refresh interval (as for plain heartbeats):
                    -- it feeds an index, so leaving it alone keeps a status change a
                    -- heap-only update (status itself has no index, migration 0003).
                    last_seen_at = CASE
                        WHEN u.seen IS NOT NULL
                             AND (v.last_seen_at IS NULL OR v.status = 'offline'
                                  OR u.seen - v.last_seen_at >= %(refresh)s)
                        THEN u.seen ELSE v.last_seen_at END,
                    battery_percent = u.battery,
                    stationary = u.stationary, actual_release_version = u.actual,
                    last_event_seq = u.seq, last_event_type = u.typ,
                    last_event_desired_state_id = u.eds, last_event_release_version = u.rel,
                    last_event_reason_code = u.reason,
                    updated_at = CASE WHEN d.changed THEN now() ELSE v.updated_at END
                FROM ingest_wide u
                JOIN json_to_recordset(%(verdicts)s::json)
                     AS d(id text, status text, codes text[], changed boolean) ON d.id = u.id
                -- By the row's address, taken under the lock above (it cannot move while
                -- the lock is held): one page read instead of an index descent per row. The
                -- id is checked as a filter (IS NOT DISTINCT FROM is not an equality the
                -- planner could turn into an index lookup from the verdicts instead).
                WHERE v.ctid = u.tid AND v.id IS NOT DISTINCT FROM u.id
                RETURNING v.id, v.status, v.reason_codes, v.region, v.model, v.org, d.changed
            ),
            feed AS ({_STATUS_DELTAS})
            SELECT count(*) FROM w
            """,
            {
                "refresh": timedelta(seconds=policy.refresh_seconds),
                "verdicts": to_json(verdicts).decode(),
            },
        )
        one = await cur.fetchone()
        written = int(one[0]) if one else 0
        if written < len(verdicts):
            raise _RowMoved
        result.vehicles_written += written
    lap("wide")

    conn = await session.connection()
    for rollout_id, items in sorted(outcomes_by_rollout.items()):
        current = await conn.execute(
            text(
                "SELECT vehicle_id, desired_state_id FROM rollout_targets"
                " WHERE rollout_id = :rid AND vehicle_id = ANY(CAST(:vids AS text[]))"
            ),
            {"rid": rollout_id, "vids": [i[0] for i in items]},
        )
        target_ds = {r.vehicle_id: r.desired_state_id for r in current}
        outcomes = [
            (vid, state, reason)
            for vid, state, reason, ds in items
            if target_ds.get(vid) is not None and str(target_ds[vid]) == str(ds)
        ]
        if outcomes:
            result.outcomes += await record_target_outcomes(
                session, rollout_id=rollout_id, outcomes=outcomes, at=now
            )
    lap("outcomes")
    return result


async def recompute_statuses(
    session: AsyncSession,
    *,
    vehicle_ids: list[str],
    offline_after_seconds: int,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Recompute the status of these vehicles from scratch (their desired state, the latest
    event of their timeline by `seq`, their latest heartbeat) and return every vehicle whose
    stored status or reason codes differ. The consistency check of the telemetry path."""
    now = now or datetime.now(UTC)
    conn = await session.connection()
    rows = await conn.execute(
        text(
            """
            SELECT v.id, v.status, v.reason_codes, v.desired_release_version,
                   v.desired_state_id, v.created_at,
                   coalesce(t.actual_release_version, v.actual_release_version) AS actual,
                   greatest(t.last_seen_at, v.last_seen_at) AS seen,
                   e.type, e.desired_state_id AS event_ds, e.release_version AS event_release,
                   e.reason_code
            FROM vehicles v
            LEFT JOIN vehicle_telemetry t ON t.vehicle_id = v.id
            LEFT JOIN LATERAL (
                SELECT type, desired_state_id, release_version, reason_code
                FROM timeline_events te WHERE te.vehicle_id = v.id
                ORDER BY seq DESC LIMIT 1
            ) e ON true
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
            actual_release=row.actual,
            latest_event=LatestEvent(
                type=row.type,
                desired_state_id=str(row.event_ds) if row.event_ds else None,
                release_version=row.event_release,
                reason_code=row.reason_code,
            )
            if row.type
            else None,
            last_seen_at=row.seen,
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
