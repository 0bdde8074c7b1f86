"""GET /vehicles: keyset pagination (stable under inserts), filters, sort and scope."""

from __future__ import annotations

import httpx

from tests.api.conftest import bearer, insert_vehicles


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
