"""GET /vehicles: keyset pagination (stable under inserts), filters, sort and scope."""

from __future__ import annotations

import httpx
import psycopg
import pytest

from tests.api.conftest import bearer
from tests.factories import insert_vehicles


async def _all_pages(http: httpx.AsyncClient, headers: dict, query: str) -> list[str]:
    ids: list[str] = []
    cursor = None
    for _ in range(100):
        url = f"/api/v1/vehicles?{query}" + (f"&cursor={cursor}" if cursor else "")
        body = (await http.get(url, headers=headers)).json()
        ids += [v["id"] for v in body["data"]]
        cursor = body["metadata"]["nextCursor"]
        assert body["metadata"]["hasMore"] is (cursor is not None)
        if cursor is None:
            return ids
    raise AssertionError("pagination did not end")


async def test_keyset_pages_cover_everything_once(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{i:03d}" for i in range(23)]
    insert_vehicles(database_url, ids)
    seen = await _all_pages(http, viewer, f"q={prefix}&limit=5")
    assert seen == sorted(ids)
    first = (await http.get(f"/api/v1/vehicles?q={prefix}&limit=5", headers=viewer)).json()
    assert first["metadata"]["limit"] == 5 and len(first["data"]) == 5


async def test_pagination_is_stable_under_inserts(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    insert_vehicles(database_url, [f"{prefix}{i:03d}" for i in range(0, 20, 2)])  # even ids
    page1 = (await http.get(f"/api/v1/vehicles?q={prefix}&limit=4", headers=viewer)).json()
    got = [v["id"] for v in page1["data"]]
    assert got == [f"{prefix}000", f"{prefix}002", f"{prefix}004", f"{prefix}006"]
    # New vehicles land before and after the cursor while the client pages.
    insert_vehicles(database_url, [f"{prefix}001", f"{prefix}003", f"{prefix}011"])
    cursor = page1["metadata"]["nextCursor"]
    rest: list[str] = []
    while cursor:
        body = (
            await http.get(f"/api/v1/vehicles?q={prefix}&limit=4&cursor={cursor}", headers=viewer)
        ).json()
        rest += [v["id"] for v in body["data"]]
        cursor = body["metadata"]["nextCursor"]
    # Nothing already seen comes again, nothing that existed is skipped, and the insert
    # after the cursor position is picked up.
    assert not set(rest) & set(got)
    assert rest == sorted([f"{prefix}{i:03d}" for i in range(8, 20, 2)] + [f"{prefix}011"])


async def test_filters_and_sort(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    insert_vehicles(database_url, [f"{prefix}A1", f"{prefix}A2"], model="atlas", ring="canary")
    insert_vehicles(database_url, [f"{prefix}B1"], model="borealis", region="us-east")
    insert_vehicles(database_url, [f"{prefix}C1"], model="corsa", release="2026.02.0")

    async def ids(query: str) -> list[str]:
        response = await http.get(f"/api/v1/vehicles?q={prefix}&{query}", headers=viewer)
        assert response.status_code == 200, response.text
        return [v["id"] for v in response.json()["data"]]

    assert await ids("model=atlas") == [f"{prefix}A1", f"{prefix}A2"]
    assert await ids("model=atlas,borealis") == [f"{prefix}A1", f"{prefix}A2", f"{prefix}B1"]
    assert await ids("model=atlas&model=corsa") == [f"{prefix}A1", f"{prefix}A2", f"{prefix}C1"]
    assert await ids("region=us-east") == [f"{prefix}B1"]
    assert await ids("ring=canary&model=atlas") == [f"{prefix}A1", f"{prefix}A2"]
    assert await ids("releaseVersion=2026.02.0") == [f"{prefix}C1"]
    assert await ids("status=failed") == []
    assert await ids("sort=-id") == sorted(await ids("sort=id"), reverse=True)
    by_seen = await ids("sort=-lastSeenAt&limit=2")
    assert len(by_seen) == 2


async def test_scoped_viewer_sees_only_its_region(
    http: httpx.AsyncClient,
    token,
    database_url: str,
    prefix: str,  # type: ignore[no-untyped-def]
) -> None:
    insert_vehicles(database_url, [f"{prefix}EU"], region="eu-west")
    insert_vehicles(database_url, [f"{prefix}US"], region="us-east")
    scoped = bearer(token("viewer", scopes={"regions": ["us-east"]}))
    listed = (await http.get(f"/api/v1/vehicles?q={prefix}", headers=scoped)).json()["data"]
    assert [v["id"] for v in listed] == [f"{prefix}US"]
    hidden = await http.get(f"/api/v1/vehicles/{prefix}EU", headers=scoped)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "NOT_FOUND"
    # Asking for the other region by filter still yields nothing.
    other = await http.get(f"/api/v1/vehicles?q={prefix}&region=eu-west", headers=scoped)
    assert other.json()["data"] == []


def _set_status(database_url: str, statuses: dict[str, str]) -> None:
    with psycopg.connect(database_url) as conn:
        for vehicle_id, status in statuses.items():
            conn.execute("UPDATE vehicles SET status = %s WHERE id = %s", (status, vehicle_id))


async def test_sort_by_status_pages_through_status_order(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{i:02d}" for i in range(9)]
    insert_vehicles(database_url, ids)
    statuses = dict(zip(ids, ["failed", "pending", "in_sync", "blocked", "failed", "updating",
                              "offline", "pending", "in_sync"], strict=True))  # fmt: skip
    _set_status(database_url, {i: s for i, s in statuses.items() if s != "in_sync"})
    expected = sorted(ids, key=lambda i: (statuses[i], i))
    assert await _all_pages(http, viewer, f"q={prefix}&sort=status&limit=2") == expected
    assert await _all_pages(http, viewer, f"q={prefix}&sort=-status&limit=4") == expected[::-1]
    failed_or_blocked = [i for i in expected if statuses[i] in ("failed", "blocked")]
    assert (
        await _all_pages(http, viewer, f"q={prefix}&status=failed,blocked&sort=status&limit=1")
        == failed_or_blocked
    )
    assert await _all_pages(http, viewer, f"q={prefix}&status=failed,blocked&limit=1") == sorted(
        failed_or_blocked
    )
    assert await _all_pages(
        http, viewer, f"q={prefix}&status=blocked,failed,failed&sort=-id&limit=2"
    ) == sorted(failed_or_blocked, reverse=True)
    by_seen = await _all_pages(
        http, viewer, f"q={prefix}&status=failed,blocked&sort=-lastSeenAt&limit=1"
    )
    assert sorted(by_seen) == sorted(failed_or_blocked)
    # A status change moves the vehicle within the order at once (same transaction).
    _set_status(database_url, {ids[2]: "failed", ids[0]: "in_sync"})
    statuses.update({ids[2]: "failed", ids[0]: "in_sync"})
    expected = sorted(ids, key=lambda i: (statuses[i], i))
    assert await _all_pages(http, viewer, f"q={prefix}&sort=status&limit=3") == expected
    assert await _all_pages(http, viewer, f"q={prefix}&status=failed") == sorted(
        i for i in ids if statuses[i] == "failed"
    )
    listed = (await http.get(f"/api/v1/vehicles?q={prefix}&sort=status", headers=viewer)).json()
    assert [v["status"] for v in listed["data"]] == sorted(statuses.values())


class _RolledBack(Exception):
    pass


def test_status_keys_follow_every_kind_of_write(own_database: str) -> None:
    """The triggers of migration 0011 keep `vehicles_by_status` equal to `vehicles` through
    INSERT, COPY, INSERT ... ON CONFLICT, UPDATE (of the status and of other columns),
    DELETE, a rollback and TRUNCATE (a database of its own: TRUNCATE would empty the shared
    one)."""
    with psycopg.connect(own_database, autocommit=True) as conn:

        def keys() -> list[tuple[str, str]]:
            return conn.execute("SELECT status, id FROM vehicles_by_status ORDER BY id").fetchall()

        add = "INSERT INTO vehicles (id, model, region, ring, status) VALUES"
        conn.execute(f"{add} ('A', 'm', 'r', 'x', 'in_sync'), ('B', 'm', 'r', 'x', 'pending')")
        copy = "COPY vehicles (id, model, region, ring, status) FROM STDIN"
        with conn.cursor().copy(copy) as cp:
            cp.write_row(("C", "m", "r", "x", "failed"))
        conn.execute(
            f"{add} ('B', 'm', 'r', 'x', 'failed'), ('D', 'm', 'r', 'x', 'offline')"
            " ON CONFLICT (id) DO UPDATE SET status = 'updating'"
        )
        assert keys() == [
            ("in_sync", "A"), ("updating", "B"), ("failed", "C"), ("offline", "D")
        ]  # fmt: skip
        conn.execute("UPDATE vehicles SET status = 'blocked' WHERE id IN ('A', 'C')")
        conn.execute("UPDATE vehicles SET ring = 'canary'")  # no status change
        with conn.transaction():
            conn.execute("UPDATE vehicles SET status = 'in_sync' WHERE id = 'D'")
            conn.execute("DELETE FROM vehicles WHERE id = 'B'")
        assert keys() == [("blocked", "A"), ("blocked", "C"), ("in_sync", "D")]
        with pytest.raises(_RolledBack), conn.transaction():
            conn.execute("UPDATE vehicles SET status = 'failed' WHERE id = 'A'")
            raise _RolledBack
        assert keys() == [("blocked", "A"), ("blocked", "C"), ("in_sync", "D")]
        # An id that changes (nothing does that; the triggers still follow it).
        conn.execute("UPDATE vehicles SET id = 'E', status = 'failed' WHERE id = 'D'")
        assert keys() == [("blocked", "A"), ("blocked", "C"), ("failed", "E")]
        conn.execute("TRUNCATE vehicles CASCADE")
        assert keys() == []
