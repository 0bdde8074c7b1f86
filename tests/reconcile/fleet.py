"""Vehicles for the reconcile tests, with plain SQL under a unique prefix (ids, regions and
models carry it, so every assertion reads only this test's rows).

Stale vehicles are last seen (and registered) in 1999: the tests use cutoffs around 2000, so
no other test's vehicle (seen or registered now) is ever stale for them."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

LONG_AGO = datetime(1999, 6, 1, tzinfo=UTC)
CUTOFF = datetime(2000, 1, 1, tzinfo=UTC)


def unique_prefix(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}-"


async def add_vehicles(
    conn: AsyncConnection,
    *,
    prefix: str,
    tag: str,
    count: int,
    last_seen_at: datetime | None,
    created_at: datetime | None = None,
    status: str = "in_sync",
    desired: str | None = "2026.1.0",
    actual: str | None = "2026.1.0",
    region: str = "r1",
    model: str = "m1",
    org: str = "default",
    reason_codes: list[str] | None = None,
) -> list[str]:
    ids = [f"{prefix}{tag}{i:04d}" for i in range(count)]
    params: dict[str, Any] = {
        "ids": ids,
        "model": prefix + model,
        "region": prefix + region,
        "org": org,
        "status": status,
        "desired": desired,
        "actual": actual,
        "seen": last_seen_at,
        "created": created_at or datetime.now(UTC),
        "codes": reason_codes or [],
    }
    await conn.execute(
        text(
            "INSERT INTO vehicles (id, model, region, ring, org, status,"
            " desired_release_version, actual_release_version, last_seen_at, created_at,"
            " updated_at, reason_codes)"
            " SELECT id, :model, :region, 'ga', :org, :status, :desired, :actual, :seen,"
            " :created, :created, CAST(:codes AS text[]) FROM unnest(CAST(:ids AS text[])) AS id"
        ),
        params,
    )
    return ids


async def statuses(conn: AsyncConnection, prefix: str) -> dict[str, str]:
    rows = await conn.execute(
        text("SELECT id, status FROM vehicles WHERE id LIKE :p ORDER BY id"), {"p": prefix + "%"}
    )
    return {r.id: r.status for r in rows}
