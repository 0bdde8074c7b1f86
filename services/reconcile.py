"""Every SQL statement of the periodic reconcile (SPEC.md, Temporal): marking vehicles offline,
recording desired-vs-actual drift, and the two reports that read the results
(`GET /api/v1/reports/reconcile`, `GET /api/v1/reports/health`).

All set-based, whatever the fleet size: no per-vehicle Python loop. Functions take an
`AsyncSession` and keyword-only arguments and only flush; the caller owns the transaction.

- Offline: a vehicle with no heartbeat since `cutoff` (`last_seen_at < cutoff`), or never
  seen and registered before `cutoff`, becomes `offline` (which wins over every other status).
  The wide row's `last_seen_at` may lag the latest heartbeat by up to
  `MOTORCADE_TELEMETRY_REFRESH_SECONDS` (docs/data-model.md), so the index finds candidates
  and the narrow `vehicle_telemetry` row, always current, has the last word.
  Marked in batches walking the `(last_seen_key, id)` index with a keyset cursor, each batch one
  statement, so the activity commits batch by batch and never locks the whole fleet at once.
  No per-vehicle `vehicle.updated` event is published (a million events at once would swamp
  the stream): one `fleet.summary` event per run that marked any, telling dashboards to refetch.
- Drift: a vehicle that has a desired release different from the one it runs (a vehicle with
  no desired release has nothing to drift from). Counted per (desired, actual, status, region,
  model, org); a NULL actual release is stored as ''.
- Pending rollouts to start: a `pending` rollout created before the grace period whose
  workflow does not exist (the API's start failed, timed out, or the API died between its
  commit and the start) is started by the reconcile's activity (`core.temporal.
  start_rollout_workflow`, USE_EXISTING / REJECT_DUPLICATE: a second start is harmless).
  Read here batch by batch (`pending_rollouts`, keyset on id over the `(status, id)` index).
- The audit entry `fleet.reconciled` is written only for a run that changed something:
  vehicles marked offline, blocked vehicles notified, pending rollouts started (or marked
  failed), or drift different from the previous run's (a quiet fleet adds no entry a minute).
- Blocked vehicles of completed rollouts: a completed rollout keeps its `blocked` targets, and
  each is notified once a heartbeat passes that rollout's safety checks, inside its
  maintenance window (SPEC.md, Rollouts). The rollouts to look at are read here
  (`rollouts_with_blocked_targets`, by the `(status, id)` index and the `blocked` counter);
  each is re-checked by the running rollout's own sweep (`services.rollouts.sweeps.
  recheck_blocked`), batch by batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from models.defaults import OFFLINE_BATCH_SIZE
from models.enums import AuditSource, RolloutStatus, VehicleStatus
from models.reports import (
    DriftRowOut,
    HealthReport,
    ReasonCodeCount,
    ReconcileReport,
    ReconcileRunOut,
)
from models.scope import Scope
from models.workflows import RolloutPolicy
from services import audit as audit_log
from services import change_feed
from services.audit import Actor
from services.rollouts.queries import as_dict
from services.scope import vehicle_scope_sql
from workflows.policy import rollout_policy

RECONCILE_ACTOR = "reconcile"
# The keyset start: before every `last_seen_key` (NULLs are the epoch there).
_BEFORE_ALL = datetime.fromisoformat("0001-01-01T00:00:00+00:00")


@dataclass(frozen=True)
class OfflineBatch:
    scanned: int
    marked: int
    last_key: datetime | None
    last_id: str | None


@dataclass(frozen=True)
class RecordedRun:
    run_id: int
    run_key: str
    drifted: int
    groups: int
    created: bool


# --- Offline ------------------------------------------------------------------------------


async def mark_offline_batch(
    session: AsyncSession,
    *,
    cutoff: datetime,
    after_key: datetime | None = None,
    after_id: str | None = None,
    batch_size: int = OFFLINE_BATCH_SIZE,
) -> OfflineBatch:
    """Mark offline the stale vehicles among the next `batch_size` index entries with
    `last_seen_key < cutoff` after the cursor `(after_key, after_id)`.

    One statement. The UPDATE re-checks staleness on the locked row, so a heartbeat that
    lands meanwhile wins. Returns how many entries were scanned (fewer than `batch_size`: the
    end) and marked, and the cursor to continue from.
    """
    conn = await session.connection()
    row = (
        await conn.execute(
            text(
                """
                WITH batch AS (
                    SELECT id, last_seen_key FROM vehicles
                    WHERE last_seen_key < :cutoff
                      AND (last_seen_key, id) > (:after_key, :after_id)
                    ORDER BY last_seen_key, id
                    LIMIT :n
                ),
                marked AS (
                    UPDATE vehicles v
                    SET status = :offline, updated_at = now()
                    FROM batch b
                    WHERE v.id = b.id
                      AND v.status <> :offline
                      AND v.last_seen_key < :cutoff
                      AND (v.last_seen_at IS NOT NULL OR v.created_at < :cutoff)
                      AND NOT EXISTS (
                          SELECT 1 FROM vehicle_telemetry p
                          WHERE p.vehicle_id = v.id AND p.last_seen_at >= :cutoff)
                    RETURNING v.id
                ),
                tail AS (
                    SELECT last_seen_key, id FROM batch ORDER BY last_seen_key DESC, id DESC
                    LIMIT 1
                )
                SELECT (SELECT count(*) FROM batch) AS scanned,
                       (SELECT count(*) FROM marked) AS marked,
                       (SELECT last_seen_key FROM tail) AS last_key,
                       (SELECT id FROM tail) AS last_id
                """
            ),
            {
                "cutoff": cutoff,
                "after_key": after_key or _BEFORE_ALL,
                "after_id": after_id or "",
                "n": batch_size,
                "offline": VehicleStatus.OFFLINE.value,
            },
        )
    ).one()
    return OfflineBatch(
        scanned=int(row.scanned),
        marked=int(row.marked),
        last_key=row.last_key,
        last_id=row.last_id,
    )


async def mark_offline(
    session: AsyncSession, *, cutoff: datetime, batch_size: int = OFFLINE_BATCH_SIZE
) -> int:
    """Mark offline every stale vehicle, batch after batch inside the caller's transaction;
    returns how many were marked. (The activity commits each batch on its own instead.)"""
    after_key: datetime | None = None
    after_id: str | None = None
    total = 0
    while True:
        batch = await mark_offline_batch(
            session, cutoff=cutoff, after_key=after_key, after_id=after_id, batch_size=batch_size
        )
        total += batch.marked
        if batch.scanned < batch_size:
            return total
        after_key, after_id = batch.last_key, batch.last_id


# --- Pending rollouts to start ---------------------------------------------------------------


@dataclass(frozen=True)
class PendingRollout:
    id: int
    release_version: str
    correlation_id: str | None
    created_by: str | None


async def pending_rollouts(
    session: AsyncSession, *, created_before: datetime, after_id: int = 0, limit: int
) -> list[PendingRollout]:
    """The next `limit` `pending` rollouts after `after_id` (id order) created before
    `created_before`: the `(status, id)` index, few rows (a pending rollout starts within
    seconds)."""
    rows = await (await session.connection()).execute(
        text(
            "SELECT id, release_version, correlation_id, created_by FROM rollouts"
            " WHERE status = :pending AND id > :after AND created_at < :before"
            " ORDER BY id LIMIT :n"
        ),
        {
            "pending": RolloutStatus.PENDING.value,
            "after": after_id,
            "before": created_before,
            "n": limit,
        },
    )
    return [
        PendingRollout(int(r.id), r.release_version, r.correlation_id, r.created_by) for r in rows
    ]


# --- Blocked vehicles of completed rollouts ----------------------------------------------


async def rollouts_with_blocked_targets(session: AsyncSession) -> list[tuple[int, RolloutPolicy]]:
    """The completed rollouts that still have blocked targets (their `blocked` counter), in id
    order, each with its policy (safety checks and maintenance window)."""
    conn = await session.connection()
    rows = await conn.execute(
        text(
            "SELECT id, gates, timeouts, retry FROM rollouts"
            " WHERE status = :completed AND blocked > 0 ORDER BY id"
        ),
        {"completed": RolloutStatus.COMPLETED.value},
    )
    return [
        (int(r.id), rollout_policy(as_dict(r.gates), as_dict(r.timeouts), as_dict(r.retry)))
        for r in rows
    ]


# --- Drift --------------------------------------------------------------------------------


async def record_drift(
    session: AsyncSession,
    *,
    run_key: str,
    marked_offline: int = 0,
    cutoff: datetime | None = None,
    correlation_id: str | None = None,
    rechecked: int = 0,
    started_rollouts: int = 0,
    refused_rollouts: int = 0,
) -> RecordedRun:
    """Record one reconcile run and the fleet's drift, once per `run_key`.

    A second call with the same key (a retried activity) changes nothing and returns the run
    recorded the first time (`created=False`); a concurrent one waits on the unique key and
    then does the same. Writes the audit entry `fleet.reconciled` only when the run changed
    something (vehicles marked offline, `rechecked` blocked vehicles notified, pending
    rollouts started or refused, or drift other than the previous run's) and, when vehicles
    were marked offline, one `fleet.summary` change-feed event.
    """
    conn = await session.connection()
    run_id = (
        await conn.execute(
            text(
                "INSERT INTO reconcile_runs (run_key, marked_offline) VALUES (:key, :marked)"
                " ON CONFLICT (run_key) DO NOTHING RETURNING id"
            ),
            {"key": run_key, "marked": marked_offline},
        )
    ).scalar_one_or_none()
    if run_id is None:
        return await _recorded_run(conn, run_key)
    by_status, groups = await _store_drift(conn, run_id)
    drifted = sum(by_status.values())
    summary: dict[str, Any] = {
        "drifted": drifted,
        "driftGroups": groups,
        "driftByStatus": by_status,
        "markedOffline": marked_offline,
        "offlineCutoff": cutoff.isoformat() if cutoff else None,
        "rechecked": rechecked,
        "startedRollouts": started_rollouts,
        "refusedRollouts": refused_rollouts,
    }
    await conn.execute(
        text(
            "UPDATE reconcile_runs SET drifted = :drifted, summary = CAST(:summary AS jsonb),"
            " finished_at = now() WHERE id = :run_id"
        ),
        {"drifted": drifted, "summary": json.dumps(summary), "run_id": run_id},
    )
    previous = (
        await conn.execute(
            text(
                "SELECT summary FROM reconcile_runs WHERE id < :run_id"
                " AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1"
            ),
            {"run_id": run_id},
        )
    ).scalar_one_or_none()
    before = as_dict(previous)
    drift_changed = (before.get("drifted", 0), before.get("driftByStatus", {})) != (
        drifted,
        by_status,
    )
    changed = marked_offline or rechecked or started_rollouts or refused_rollouts
    if changed or drift_changed:
        await _audit_run(session, run_id, run_key, summary, correlation_id)
    if marked_offline:
        await change_feed.publish(
            session,
            topic="vehicles",
            event="fleet.summary",
            entity_id=None,
            payload={"reason": "reconcile", "runId": run_id},
        )
    return RecordedRun(
        run_id=int(run_id), run_key=run_key, drifted=drifted, groups=groups, created=True
    )


async def _audit_run(
    session: AsyncSession,
    run_id: int,
    run_key: str,
    summary: dict[str, Any],
    correlation_id: str | None,
) -> None:
    """The run's audit entry `fleet.reconciled` (a run that changed something)."""
    await audit_log.record(
        session,
        actor=Actor(RECONCILE_ACTOR, None, AuditSource.SYSTEM, correlation_id or run_key),
        action="fleet.reconciled",
        target_type="fleet",
        target_id=None,
        payload={"runId": run_id, "runKey": run_key, **summary},
    )


async def _recorded_run(conn: AsyncConnection, run_key: str) -> RecordedRun:
    """The run recorded already under `run_key`."""
    row = (
        await conn.execute(
            text(
                "SELECT r.id, r.drifted,"
                " (SELECT count(*) FROM reconcile_drift d WHERE d.run_id = r.id) AS groups"
                " FROM reconcile_runs r WHERE r.run_key = :key"
            ),
            {"key": run_key},
        )
    ).one()
    return RecordedRun(
        run_id=int(row.id),
        run_key=run_key,
        drifted=int(row.drifted),
        groups=int(row.groups),
        created=False,
    )


async def _store_drift(conn: AsyncConnection, run_id: int) -> tuple[dict[str, int], int]:
    """Store the run's drift rows (one per desired, actual, status, region, model, org) and
    return the drifted vehicles per status and the number of rows."""
    await conn.execute(
        text(
            """
            INSERT INTO reconcile_drift (run_id, desired_release_version, actual_release_version,
                                         status, region, model, org, vehicles)
            SELECT :run_id, desired_release_version, coalesce(actual_release_version, ''),
                   status, region, model, org, count(*)
            FROM vehicles
            WHERE desired_release_version IS NOT NULL
              AND desired_release_version IS DISTINCT FROM actual_release_version
            GROUP BY desired_release_version, coalesce(actual_release_version, ''),
                     status, region, model, org
            """
        ),
        {"run_id": run_id},
    )
    by_status: dict[str, int] = {}
    groups = 0
    for status, vehicles, n in await conn.execute(
        text(
            "SELECT status, sum(vehicles), count(*) FROM reconcile_drift WHERE run_id = :run_id"
            " GROUP BY status ORDER BY status"
        ),
        {"run_id": run_id},
    ):
        by_status[status] = int(vehicles)
        groups += int(n)
    return by_status, groups


# --- Reports ------------------------------------------------------------------------------


async def latest_report(
    session: AsyncSession, *, scope: Scope, recent: int = 10, drift_limit: int = 500
) -> ReconcileReport:
    """The latest finished reconcile run with its drift rows (inside `scope`, largest first,
    at most `drift_limit`), and the `recent` latest finished runs.

    For a scoped caller a run's `drifted` is the sum of its drift rows inside the scope, and
    `markedOffline` (fleet-wide, not recorded per place) is null.
    """
    conn = await session.connection()
    where, params = vehicle_scope_sql(scope, "d")
    scoped = not scope.unrestricted
    drifted_sql = (
        f"(SELECT coalesce(sum(d.vehicles), 0) FROM reconcile_drift d WHERE d.run_id = r.id{where})"
        if scoped
        else "r.drifted"
    )
    rows = (
        await conn.execute(
            text(
                f"SELECT r.id, r.run_key, r.started_at, r.finished_at, r.marked_offline,"
                f" {drifted_sql} AS drifted"
                f" FROM reconcile_runs r WHERE r.finished_at IS NOT NULL"
                f" ORDER BY r.started_at DESC, r.id DESC LIMIT :recent"
            ),
            {**params, "recent": recent},
        )
    ).all()
    runs = [
        ReconcileRunOut(
            id=r.id,
            run_key=r.run_key,
            started_at=r.started_at,
            finished_at=r.finished_at,
            marked_offline=None if scoped else r.marked_offline,
            drifted=int(r.drifted),
        )
        for r in rows
    ]
    if not runs:
        return ReconcileReport(latest=None, drift=[], recent_runs=[])
    latest = runs[0]
    drift_rows = (
        await conn.execute(
            text(
                f"SELECT d.desired_release_version, d.actual_release_version, d.status,"
                f" d.region, d.model, d.org, d.vehicles FROM reconcile_drift d"
                f" WHERE d.run_id = :run_id{where}"
                f" ORDER BY d.vehicles DESC, d.desired_release_version, d.actual_release_version,"
                f" d.status, d.region, d.model, d.org LIMIT :n"
            ),
            {**params, "run_id": latest.id, "n": drift_limit + 1},
        )
    ).all()
    drift = [
        DriftRowOut(
            desired_release_version=d.desired_release_version or None,
            actual_release_version=d.actual_release_version or None,
            status=d.status,
            region=d.region,
            model=d.model,
            org=d.org,
            vehicles=d.vehicles,
        )
        for d in drift_rows[:drift_limit]
    ]
    return ReconcileReport(
        latest=latest,
        drift=drift,
        drift_truncated=len(drift_rows) > drift_limit,
        recent_runs=runs,
    )


async def fleet_health(session: AsyncSession, *, scope: Scope, top: int = 10) -> HealthReport:
    """Counts by status and the top reason codes of the vehicles inside `scope`, live: a
    GROUP BY status scan and an unnest of `reason_codes` (dashboards read the materialized
    `services.fleet.fleet_summary` instead)."""
    conn = await session.connection()
    where, params = vehicle_scope_sql(scope)
    by_status = {s.value: 0 for s in VehicleStatus}
    for status, n in await conn.execute(
        text(f"SELECT status, count(*) FROM vehicles WHERE true{where} GROUP BY status"), params
    ):
        by_status[status] = int(n)
    codes = await conn.execute(
        text(
            f"SELECT code, count(*) AS n FROM vehicles, unnest(reason_codes) AS code"
            f" WHERE reason_codes <> '{{}}'{where}"
            f" GROUP BY code ORDER BY n DESC, code LIMIT :top"
        ),
        {**params, "top": top},
    )
    return HealthReport(
        total=sum(by_status.values()),
        by_status=by_status,
        offline=by_status[VehicleStatus.OFFLINE.value],
        top_reason_codes=[ReasonCodeCount(reason_code=c, vehicles=int(n)) for c, n in codes],
    )
