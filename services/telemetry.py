"""Every SQL statement of telemetry ingestion: one group of requests written in one transaction.

A group is the merge of many concurrent `POST /telemetry` requests (see services/ingest.py).
`write_group` does, set-based and in a fixed lock order (telemetry rows, then vehicles, then
rollout targets, each sorted by vehicle id):

1. Resolves the vehicles named by the group (existence and the caller's scope); a request
   naming an unknown or out-of-scope vehicle is refused whole and nothing of it is written.
2. Inserts the events with one `unnest` array insert, `ON CONFLICT DO NOTHING` on the primary
   key (vehicle_id, event_id): what comes back was new, the rest are duplicates.
3. Upserts the narrow `vehicle_telemetry` row of every vehicle touched: the latest heartbeat
   wins (by `sentAt`), the event with the highest `seq` becomes the latest event only when it
   is above the stored one (a late event enters the timeline but moves nothing).
4. Derives each touched vehicle's status with the pure `derive_status`, and rewrites the wide
   `vehicles` row only when something visible changed: status or reason codes, actual release,
   stationary, battery by `battery_step` points or more, or last seen by `refresh_seconds` or
   more. Status changes go to the change feed (`vehicle.updated`).
5. Feeds rollout outcomes through `record_target_outcomes`: the latest event of a vehicle,
   when it is about its rollout target's own desired state.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from models.enums import EventType
from models.scope import Scope
from models.telemetry import EventIn, HeartbeatIn, TelemetryBatch
from models.vehicle_status import LatestEvent, derive_status
from services.rollout_targets import record_target_outcomes

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


def _in_scope(scope: Scope, row: Any) -> bool:
    return all(
        allowed is None or value in allowed
        for allowed, value in (
            (scope.regions, row.region),
            (scope.models, row.model),
            (scope.orgs, row.org),
        )
    )


async def _resolve(session: AsyncSession, requests: list[GroupRequest]) -> None:
    """Refuse (whole) each request that names an unknown or out-of-scope vehicle."""
    ids = sorted(
        {h.vehicle_id for r in requests for h in r.batch.heartbeats}
        | {e.vehicle_id for r in requests for e in r.batch.events}
    )
    if not ids:
        return
    conn = await session.connection()
    rows = await conn.execute(
        text("SELECT id, region, model, org FROM vehicles WHERE id = ANY(CAST(:ids AS text[]))"),
        {"ids": ids},
    )
    known = {row.id: row for row in rows}
    for req in requests:
        details: list[dict[str, Any]] = []
        named: list[tuple[str, Sequence[HeartbeatIn | EventIn]]] = [
            ("heartbeats", req.batch.heartbeats),
            ("events", req.batch.events),
        ]
        for kind, items in named:
            for index, item in enumerate(items):
                row = known.get(item.vehicle_id)
                if row is None or not _in_scope(req.scope, row):
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


async def write_group(
    session: AsyncSession,
    *,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime | None = None,
) -> GroupResult:
    """Write one group (the caller commits). Fills each request's accepted/duplicates/refused."""
    now = now or datetime.now(UTC)
    result = GroupResult()
    await _resolve(session, requests)
    live = [r for r in requests if r.refused is None]
    result.refused_requests = len(requests) - len(live)
    conn = await session.connection()

    # -- events: dedupe inside the group (first wins), then one array insert ---------------
    owner: dict[tuple[str, uuid.UUID], GroupRequest] = {}
    events: list[EventIn] = []
    for req in live:
        for ev in req.batch.events:
            key = (ev.vehicle_id, ev.event_id)
            if key in owner:
                req.duplicates += 1
                continue
            owner[key] = req
            events.append(ev)
    inserted: set[tuple[str, uuid.UUID]] = set()
    if events:
        rows = await conn.execute(
            text(
                """
                INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at,
                    desired_state_id, release_version, reason_code, details)
                SELECT vid, eid, seq, typ, occ, ds, rel, reason, CAST(det AS jsonb)
                FROM unnest(CAST(:vid AS text[]), CAST(:eid AS uuid[]), CAST(:seq AS bigint[]),
                            CAST(:typ AS text[]), CAST(:occ AS timestamptz[]),
                            CAST(:ds AS uuid[]), CAST(:rel AS text[]),
                            CAST(:reason AS text[]), CAST(:det AS text[]))
                     AS u(vid, eid, seq, typ, occ, ds, rel, reason, det)
                ON CONFLICT (vehicle_id, event_id) DO NOTHING
                RETURNING vehicle_id, event_id
                """
            ),
            {
                "vid": [e.vehicle_id for e in events],
                "eid": [e.event_id for e in events],
                "seq": [e.seq for e in events],
                "typ": [e.type.value for e in events],
                "occ": [e.occurred_at for e in events],
                "ds": [e.desired_state_id for e in events],
                "rel": [e.release_version for e in events],
                "reason": [e.reason_code for e in events],
                "det": [json.dumps(e.details, separators=(",", ":")) for e in events],
            },
        )
        inserted = {(r.vehicle_id, r.event_id) for r in rows}
    for key, req in owner.items():
        if key in inserted:
            req.accepted += 1
        else:
            req.duplicates += 1
    result.events_inserted = len(inserted)
    result.duplicates = sum(r.duplicates for r in live)

    # -- per vehicle: the newest heartbeat and the highest-seq new event -------------------
    beats: dict[str, HeartbeatIn] = {}
    for req in live:
        for hb in req.batch.heartbeats:
            seen = beats.get(hb.vehicle_id)
            if seen is None or hb.sent_at >= seen.sent_at:
                beats[hb.vehicle_id] = hb
    top: dict[str, EventIn] = {}
    for ev in events:
        if (ev.vehicle_id, ev.event_id) in inserted:
            best = top.get(ev.vehicle_id)
            if best is None or ev.seq > best.seq:
                top[ev.vehicle_id] = ev
    result.heartbeats = len(beats)
    vids = sorted(set(beats) | set(top))
    if not vids:
        return result

    def hb_of(v: str) -> HeartbeatIn | None:
        return beats.get(v)

    def ev_of(v: str) -> EventIn | None:
        return top.get(v)

    rows = await conn.execute(
        text(
            """
            WITH u AS (
                SELECT * FROM unnest(
                    CAST(:vid AS text[]), CAST(:has_hb AS boolean[]),
                    CAST(:seen AS timestamptz[]), CAST(:battery AS smallint[]),
                    CAST(:stationary AS boolean[]), CAST(:actual AS text[]),
                    CAST(:seq AS bigint[]), CAST(:typ AS text[]), CAST(:ds AS uuid[]),
                    CAST(:rel AS text[]), CAST(:reason AS text[]))
                AS u(vid, has_hb, seen, battery, stationary, actual, seq, typ, ds, rel, reason)
            ),
            up AS (
                INSERT INTO vehicle_telemetry AS t (vehicle_id, last_seen_at, battery_percent,
                    stationary, actual_release_version, last_event_seq, last_event_type,
                    last_event_desired_state_id, last_event_release_version,
                    last_event_reason_code)
                SELECT u.vid,
                       CASE WHEN u.has_hb THEN greatest(u.seen, v.last_seen_at)
                            ELSE v.last_seen_at END,
                       CASE WHEN u.has_hb AND u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.battery, v.battery_percent)
                            ELSE v.battery_percent END,
                       CASE WHEN u.has_hb AND u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.stationary, v.stationary)
                            ELSE v.stationary END,
                       CASE WHEN u.has_hb AND u.seen >= coalesce(v.last_seen_at, '-infinity')
                            THEN coalesce(u.actual, v.actual_release_version)
                            ELSE v.actual_release_version END,
                       CASE WHEN u.seq > v.last_event_seq THEN u.seq ELSE v.last_event_seq END,
                       CASE WHEN u.seq > v.last_event_seq THEN u.typ END,
                       CASE WHEN u.seq > v.last_event_seq THEN u.ds END,
                       CASE WHEN u.seq > v.last_event_seq THEN u.rel END,
                       CASE WHEN u.seq > v.last_event_seq THEN u.reason END
                FROM u JOIN vehicles v ON v.id = u.vid
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
                        THEN EXCLUDED.actual_release_version ELSE t.actual_release_version END,
                    last_event_seq = greatest(t.last_event_seq, EXCLUDED.last_event_seq),
                    last_event_type = CASE WHEN EXCLUDED.last_event_seq > t.last_event_seq
                        THEN EXCLUDED.last_event_type ELSE t.last_event_type END,
                    last_event_desired_state_id = CASE
                        WHEN EXCLUDED.last_event_seq > t.last_event_seq
                        THEN EXCLUDED.last_event_desired_state_id
                        ELSE t.last_event_desired_state_id END,
                    last_event_release_version = CASE
                        WHEN EXCLUDED.last_event_seq > t.last_event_seq
                        THEN EXCLUDED.last_event_release_version
                        ELSE t.last_event_release_version END,
                    last_event_reason_code = CASE
                        WHEN EXCLUDED.last_event_seq > t.last_event_seq
                        THEN EXCLUDED.last_event_reason_code ELSE t.last_event_reason_code END
                RETURNING t.*
            )
            SELECT up.*, v.status, v.reason_codes, v.desired_release_version,
                   v.desired_state_id, v.rollout_id, v.created_at,
                   v.last_seen_at AS wide_seen, v.battery_percent AS wide_battery,
                   v.stationary AS wide_stationary, v.actual_release_version AS wide_actual,
                   v.region, v.model, v.org
            FROM up JOIN vehicles v ON v.id = up.vehicle_id
            ORDER BY up.vehicle_id
            """
        ),
        {
            "vid": vids,
            "has_hb": [hb_of(v) is not None for v in vids],
            "seen": [_h.sent_at if (_h := hb_of(v)) else None for v in vids],
            "battery": [_h.battery_percent if (_h := hb_of(v)) else None for v in vids],
            "stationary": [_h.stationary if (_h := hb_of(v)) else None for v in vids],
            "actual": [_h.actual_release_version if (_h := hb_of(v)) else None for v in vids],
            "seq": [_e.seq if (_e := ev_of(v)) else -1 for v in vids],
            "typ": [_e.type.value if (_e := ev_of(v)) else None for v in vids],
            "ds": [_e.desired_state_id if (_e := ev_of(v)) else None for v in vids],
            "rel": [_e.release_version if (_e := ev_of(v)) else None for v in vids],
            "reason": [_e.reason_code if (_e := ev_of(v)) else None for v in vids],
        },
    )

    wide: list[dict[str, Any]] = []
    outcomes_by_rollout: dict[int, list[tuple[str, str, str | None, uuid.UUID]]] = defaultdict(list)
    refresh = timedelta(seconds=policy.refresh_seconds)
    for row in rows:
        latest = (
            LatestEvent(
                type=row.last_event_type,
                desired_state_id=str(row.last_event_desired_state_id)
                if row.last_event_desired_state_id
                else None,
                release_version=row.last_event_release_version,
                reason_code=row.last_event_reason_code,
            )
            if row.last_event_type
            else None
        )
        derived = derive_status(
            desired_release=row.desired_release_version,
            desired_state_id=str(row.desired_state_id) if row.desired_state_id else None,
            actual_release=row.actual_release_version,
            latest_event=latest,
            last_seen_at=row.last_seen_at,
            registered_at=row.created_at,
            now=now,
            offline_after_seconds=policy.offline_after_seconds,
        )
        codes = list(derived.reason_codes)
        status_changed = derived.status.value != row.status or codes != list(row.reason_codes or [])
        visible = (
            status_changed
            or row.actual_release_version != row.wide_actual
            or row.stationary != row.wide_stationary
            or (row.battery_percent is None) != (row.wide_battery is None)
            or (
                row.battery_percent is not None
                and row.wide_battery is not None
                and abs(row.battery_percent - row.wide_battery) >= policy.battery_step
            )
            or (
                row.last_seen_at is not None
                and (row.wide_seen is None or row.last_seen_at - row.wide_seen >= refresh)
            )
        )
        if visible:
            wide.append(
                {
                    "id": row.vehicle_id,
                    "status": derived.status.value,
                    "codes": "{" + ",".join(codes) + "}",
                    "seen": row.last_seen_at,
                    "battery": row.battery_percent,
                    "stationary": row.stationary,
                    "actual": row.actual_release_version,
                    "seq": row.last_event_seq,
                    "ds": row.desired_state_id,
                    "changed": status_changed,
                }
            )
        latest_new = top.get(row.vehicle_id)
        if (
            latest_new is not None
            and row.last_event_seq == latest_new.seq
            and row.rollout_id is not None
            and latest_new.desired_state_id is not None
        ):
            outcome = OUTCOME_OF_EVENT[latest_new.type]
            outcomes_by_rollout[int(row.rollout_id)].append(
                (row.vehicle_id, outcome, latest_new.reason_code, latest_new.desired_state_id)
            )

    if wide:
        written = await conn.execute(
            text(
                """
                WITH u AS (
                    SELECT * FROM unnest(
                        CAST(:id AS text[]), CAST(:status AS text[]), CAST(:codes AS text[]),
                        CAST(:seen AS timestamptz[]), CAST(:battery AS smallint[]),
                        CAST(:stationary AS boolean[]), CAST(:actual AS text[]),
                        CAST(:seq AS bigint[]), CAST(:ds AS uuid[]), CAST(:changed AS boolean[]))
                    AS u(id, status, codes, seen, battery, stationary, actual, seq, ds, changed)
                ),
                w AS (
                    UPDATE vehicles v
                    SET status = u.status, reason_codes = CAST(u.codes AS text[]),
                        last_seen_at = u.seen, battery_percent = u.battery,
                        stationary = u.stationary, actual_release_version = u.actual,
                        last_event_seq = u.seq,
                        updated_at = CASE WHEN u.changed THEN now() ELSE v.updated_at END
                    FROM u
                    WHERE v.id = u.id AND v.desired_state_id IS NOT DISTINCT FROM u.ds
                    RETURNING v.id, v.status, v.reason_codes, v.region, v.model, v.org,
                              u.changed
                ),
                feed AS (
                    INSERT INTO change_feed (topic, event, entity_id, payload, region, model,
                                             org)
                    SELECT 'vehicles', 'vehicle.updated', w.id,
                           jsonb_build_object('id', w.id, 'status', w.status,
                                              'reasonCodes', to_jsonb(w.reason_codes)),
                           w.region, w.model, w.org
                    FROM w WHERE w.changed
                )
                SELECT count(*) FROM w
                """
            ),
            {
                key: [w[key] for w in wide]
                for key in (
                    "id",
                    "status",
                    "codes",
                    "seen",
                    "battery",
                    "stationary",
                    "actual",
                    "seq",
                    "ds",
                    "changed",
                )
            },
        )
        result.vehicles_written = int(written.scalar_one())

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
