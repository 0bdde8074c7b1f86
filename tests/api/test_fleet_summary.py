"""GET /fleet/summary over real PostgreSQL: the counts of the materialization refreshed by
reconcile (and the seeder), equal to a count of the vehicles themselves, inside the caller's
scope, and unchanged by writes until the next refresh (no scan per request)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from services.fleet import refresh_fleet_counts
from tests.api.conftest import bearer
from tests.factories import insert_vehicles

URL = "/api/v1/fleet/summary"


def set_status(database_url: str, ids: list[str], status: str, codes: list[str]) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE vehicles SET status = %s, reason_codes = %s WHERE id = ANY(%s)",
            (status, codes, ids),
        )


async def refresh(sessions: Any) -> None:
    async with sessions() as session:
        await refresh_fleet_counts(session)
        await session.commit()


async def test_summary_counts_the_scope_from_the_materialization(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    model = f"{prefix}m"
    west = [f"{prefix}w{i}" for i in range(6)]
    east = [f"{prefix}e{i}" for i in range(3)]
    insert_vehicles(database_url, west, model=model, region="eu-west", ring="canary")
    insert_vehicles(database_url, east, model=model, region="us-east", ring="broad")
    set_status(database_url, west[:2], "blocked", ["BATTERY_LOW"])
    set_status(database_url, west[2:3], "failed", ["APPLY_FAILED"])
    set_status(database_url, east[:1], "blocked", ["BATTERY_LOW", "NOT_STATIONARY"])
    await refresh(sessions)

    scoped = bearer(token("viewer", scopes={"models": [model]}))
    r = await http.get(URL, headers=scoped)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["asOf"] is not None
    assert data["total"] == 9
    assert data["byStatus"]["blocked"] == 3 and data["byStatus"]["failed"] == 1
    assert data["byStatus"]["in_sync"] == 5 and data["byStatus"]["offline"] == 0
    assert data["byModel"] == {
        model: {"total": 9, "byStatus": {"blocked": 3, "failed": 1, "in_sync": 5}}
    }
    assert data["byRegion"]["eu-west"]["total"] == 6 and data["byRegion"]["us-east"]["total"] == 3
    assert data["byRing"]["canary"]["byStatus"] == {"blocked": 2, "failed": 1, "in_sync": 3}
    codes = {c["reasonCode"]: c["vehicles"] for c in data["topReasonCodes"]}
    assert codes == {"BATTERY_LOW": 2 + 1, "APPLY_FAILED": 1, "NOT_STATIONARY": 1}

    # A narrower scope sees its part only.
    west_only = bearer(token("viewer", scopes={"models": [model], "regions": ["eu-west"]}))
    part = (await http.get(URL, headers=west_only)).json()["data"]
    assert part["total"] == 6 and set(part["byRegion"]) == {"eu-west"}

    # Writes are not seen until the next refresh; then they are.
    set_status(database_url, east, "offline", [])
    assert (await http.get(URL, headers=scoped)).json()["data"]["byStatus"]["offline"] == 0
    await refresh(sessions)
    assert (await http.get(URL, headers=scoped)).json()["data"]["byStatus"]["offline"] == 3


async def test_the_unscoped_summary_equals_a_count_of_the_fleet(
    http: httpx.AsyncClient, viewer: dict, database_url: str, sessions: Any
) -> None:
    await refresh(sessions)
    data = (await http.get(URL, headers=viewer)).json()["data"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT model, status FROM vehicles").fetchall()
    assert data["total"] == len(rows)
    assert {k: v for k, v in data["byStatus"].items() if v} == dict(Counter(s for _, s in rows))
    assert {m: c["total"] for m, c in data["byModel"].items()} == dict(Counter(m for m, _ in rows))


async def test_a_summary_is_computed_once_per_refresh(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    sessions: Any,
) -> None:
    """The process keeps a summary until `refreshed_at` moves: counts changed under it (only a
    refresh changes them) are read when the refresh is seen, not before."""
    model = f"{prefix}m"
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(4)], model=model)
    await refresh(sessions)
    scoped = bearer(token("viewer", scopes={"models": [model]}))
    assert (await http.get(URL, headers=scoped)).json()["data"]["total"] == 4
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE fleet_counts SET vehicles = vehicles + 10 WHERE model = %s", [model])
    assert (await http.get(URL, headers=scoped)).json()["data"]["total"] == 4  # kept
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM fleet_counts WHERE model = %s", [model])
        places = rows.fetchone()
        conn.execute("UPDATE fleet_counts_meta SET refreshed_at = refreshed_at + interval '1 ms'")
    assert places is not None
    data = (await http.get(URL, headers=scoped)).json()["data"]
    assert data["total"] == 4 + 10 * places[0]  # a new refreshed_at: read again
