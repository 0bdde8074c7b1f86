"""The fleet summary (`GET /fleet/summary`) from a materialization, not a scan per request.

Each reconcile run calls `refresh_fleet_counts`: one scan of `vehicles` grouped by place
(model, region, ring, org) and status, and one of their reason codes, replacing
`fleet_counts` and `fleet_reason_counts` in one transaction (readers see the old or the new
counts, never a mix). A summary sums the rows inside the caller's scope: a few hundred rows
however large the fleet. The counts are as of `asOf` (the last refresh; every
MOTORCADE_RECONCILE_INTERVAL_SECONDS, 60 by default), which the answer says.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import fetch
from models.enums import VehicleStatus
from models.reports import FleetSummary, PlaceCounts, ReasonCodeCount
from models.scope import Scope
from services.scope import vehicle_scope_sql

PLACES = ("model", "region", "ring")


REFRESH = (
    "LOCK TABLE fleet_counts, fleet_reason_counts IN EXCLUSIVE MODE",
    "DELETE FROM fleet_counts",
    "INSERT INTO fleet_counts (model, region, ring, org, status, vehicles)"
    " SELECT model, region, ring, org, status, count(*) FROM vehicles"
    " GROUP BY model, region, ring, org, status",
    "DELETE FROM fleet_reason_counts",
    "INSERT INTO fleet_reason_counts (model, region, ring, org, reason_code, vehicles)"
    " SELECT model, region, ring, org, code, count(*)"
    " FROM vehicles, unnest(reason_codes) AS code WHERE reason_codes <> '{}'"
    " GROUP BY model, region, ring, org, code",
)
REFRESHED = (
    "INSERT INTO fleet_counts_meta (id, refreshed_at, seconds) VALUES (1, now(), %(s)s)"
    " ON CONFLICT (id) DO UPDATE SET refreshed_at = now(), seconds = EXCLUDED.seconds"
)
# The `fleet.summary` change-feed row of a refresh, in its transaction: a prompt to re-read
# GET /fleet/summary (scoped there), so it carries only when the counts were refreshed.
PUBLISH_REFRESHED = (
    "INSERT INTO change_feed (topic, event, entity_id, payload)"
    " SELECT 'vehicles', 'fleet.summary', NULL,"
    " jsonb_build_object('reason', 'refreshed', 'refreshedAt', refreshed_at, 'seconds', seconds)"
    " FROM fleet_counts_meta WHERE id = 1"
)


async def refresh_fleet_counts(session: AsyncSession) -> float:
    """Recompute the materialization (the caller commits); returns the seconds it took."""
    started = time.perf_counter()
    conn = await session.connection()
    for statement in REFRESH:
        await conn.exec_driver_sql(statement)
    seconds = time.perf_counter() - started
    await conn.exec_driver_sql(REFRESHED, {"s": seconds})
    await conn.exec_driver_sql(PUBLISH_REFRESHED)
    return seconds


def refresh_fleet_counts_now(conn: Any) -> float:
    """The same with a plain psycopg connection (the seeder, after it fills the fleet)."""
    started = time.perf_counter()
    for statement in REFRESH:
        conn.execute(statement)
    seconds = time.perf_counter() - started
    conn.execute(REFRESHED, {"s": seconds})
    conn.execute(PUBLISH_REFRESHED)
    return seconds


SUMMARY_ENTRIES = 1024


class SummaryCache:
    """Summaries computed since the counts' last refresh, by (scope, top): the counts change
    only when a refresh commits (a new `refreshed_at`), so between two refreshes a summary is
    one primary-key read. One per app (one database); bounded, the oldest entry goes first."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Scope, int], tuple[datetime, FleetSummary]] = {}

    def put(self, key: tuple[Scope, int], as_of: datetime, summary: FleetSummary) -> None:
        if len(self.entries) >= SUMMARY_ENTRIES:
            del self.entries[next(iter(self.entries))]
        self.entries[key] = (as_of, summary)


async def fleet_summary(
    conn: AsyncConnection[Any], *, scope: Scope, cache: SummaryCache, top: int = 10
) -> FleetSummary:
    """Counts inside `scope` by status, by model, region and ring (each with its statuses),
    and the `top` reason codes, as of the last refresh (all zero before the first one)."""
    meta = await fetch(conn, "SELECT refreshed_at FROM fleet_counts_meta WHERE id = 1", {})
    as_of: datetime | None = meta[0]["refreshed_at"] if meta else None
    known = cache.entries.get((scope, top))
    if known is not None and as_of is not None and known[0] == as_of:
        return known[1]
    where, params = vehicle_scope_sql(scope, driver=True)
    by_status = {s.value: 0 for s in VehicleStatus}
    by_place: dict[str, dict[str, PlaceCounts]] = {p: {} for p in PLACES}
    rows = await fetch(
        conn,
        "SELECT model, region, ring, status, sum(vehicles)::bigint AS n FROM fleet_counts"
        f" WHERE true{where} GROUP BY model, region, ring, status",
        params,
    )
    sums: dict[str, dict[str, dict[str, int]]] = {
        p: defaultdict(lambda: defaultdict(int)) for p in PLACES
    }
    for row in rows:
        status, n = row["status"], row["n"]
        by_status[status] = by_status.get(status, 0) + n
        for place in PLACES:
            sums[place][row[place]][status] += n
    for place, values in sums.items():
        for value, statuses in sorted(values.items()):
            by_place[place][value] = PlaceCounts(
                total=sum(statuses.values()), by_status=dict(sorted(statuses.items()))
            )
    codes = await fetch(
        conn,
        "SELECT reason_code, sum(vehicles)::bigint AS n FROM fleet_reason_counts"
        f" WHERE true{where} GROUP BY reason_code ORDER BY n DESC, reason_code LIMIT %(top)s",
        {**params, "top": top},
    )
    summary = FleetSummary(
        as_of=as_of,
        total=sum(by_status.values()),
        by_status=by_status,
        by_model=by_place["model"],
        by_region=by_place["region"],
        by_ring=by_place["ring"],
        top_reason_codes=[
            ReasonCodeCount(reason_code=c["reason_code"], vehicles=c["n"]) for c in codes
        ],
    )
    if as_of is not None:
        cache.put((scope, top), as_of, summary)
    return summary
