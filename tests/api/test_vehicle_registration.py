"""POST /api/v1/vehicles: one vehicle or a batch, all or none, scoped, audited, replayable."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg

from core.settings import Settings
from tests.api.conftest import bearer, serve_app
from tests.api.test_envelopes import assert_error


def vehicle(vid: str, **over: object) -> dict[str, object]:
    return {"id": vid, "model": "atlas", "region": "eu-west", "ring": "canary", **over}


def stored(database_url: str, ids: list[str]) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, model, region, ring, org, metadata, status FROM vehicles"
            " WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()


async def test_register_one_then_read_it(
    http: httpx.AsyncClient, operator: dict, viewer: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}REG"
    response = await http.post(
        "/api/v1/vehicles",
        headers={**operator, "X-Request-ID": f"reg-{prefix}"},
        json=vehicle(vid, org="acme", metadata={"vin": "X1"}),
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/api/v1/vehicles/{vid}"
    [created] = response.json()["data"]
    assert created["id"] == vid and created["org"] == "acme" and created["status"] == "in_sync"
    assert created["desired"]["releaseVersion"] is None
    one = await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)
    assert one.status_code == 200 and one.json()["data"]["metadata"] == {"vin": "X1"}
    with psycopg.connect(database_url) as conn:
        entry = conn.execute(
            "SELECT actor, action, target_type, target_id, correlation_id, regions FROM audit_log"
            " WHERE action = 'vehicle.registered' AND target_id = %s",
            (vid,),
        ).fetchall()
        feed = conn.execute(
            "SELECT payload FROM change_feed WHERE event = 'vehicle.updated'"
            " AND payload->'vehicles' @> %s::jsonb",
            (f'[{{"id": "{vid}", "registered": true}}]',),
        ).fetchall()
    assert entry == [
        ("dev-operator", "vehicle.registered", "vehicle", vid, f"reg-{prefix}", ["eu-west"])
    ]
    assert len(feed) == 1


async def test_a_batch_is_all_or_none(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}B{i}" for i in range(3)]
    first = await http.post(
        "/api/v1/vehicles", headers=operator, json={"vehicles": [vehicle(i) for i in ids]}
    )
    assert first.status_code == 201, first.text
    assert [v["id"] for v in first.json()["data"]] == ids
    assert "location" not in first.headers

    # One id registered already: 409 naming it, and the new one is not stored either.
    fresh = f"{prefix}B9"
    again = await http.post(
        "/api/v1/vehicles",
        headers=operator,
        json={"vehicles": [vehicle(fresh), vehicle(ids[1])]},
    )
    body = assert_error(again, 409, "CONFLICT")
    assert body["error"]["details"] == [
        {"field": "vehicles.1.id", "message": f"{ids[1]!r} is registered already"}
    ]
    assert stored(database_url, [fresh]) == []

    twice = await http.post(
        "/api/v1/vehicles", headers=operator, json={"vehicles": [vehicle(fresh), vehicle(fresh)]}
    )
    assert assert_error(twice, 422, "VALIDATION_ERROR")["error"]["details"][0]["field"] == (
        "vehicles.1.id"
    )
    assert stored(database_url, [fresh]) == []


async def test_bad_input_is_refused_with_its_field(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    bad_bodies: list[dict[str, object]] = [
        vehicle(f"{prefix} has spaces"),
        vehicle(f"{prefix}X", model=""),
        vehicle(f"{prefix}X", colour="red"),
        {"vehicles": []},
        {"vehicles": [vehicle(f"{prefix}Y{i}") for i in range(501)]},
    ]
    for bad in bad_bodies:
        response = await http.post("/api/v1/vehicles", headers=operator, json=bad)
        assert_error(response, 422, "VALIDATION_ERROR")
    assert stored(database_url, [f"{prefix}X", f"{prefix}Y0"]) == []


async def test_a_scoped_operator_registers_nothing_by_default(
    http: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    """Vehicle ids are one namespace for the fleet: by default a scoped operator may not
    register (tests/api/test_scoping_leaks.py shows the answer tells it nothing)."""
    scoped = bearer(token("operator", scopes={"regions": ["eu-west"]}))
    inside = await http.post("/api/v1/vehicles", headers=scoped, json=vehicle(f"{prefix}IN"))
    body = assert_error(inside, 403, "FORBIDDEN")
    assert body["error"]["details"][0]["field"] == "vehicles"
    assert stored(database_url, [f"{prefix}IN"]) == []


async def test_a_scoped_operator_registers_only_inside_its_scope_when_allowed(
    token: Callable[..., str], api_settings: Settings, database_url: str, prefix: str
) -> None:
    allowed = api_settings.model_copy(update={"scoped_vehicle_registration": True})
    async with serve_app(allowed) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _registers_only_inside_its_scope(http, token, database_url, prefix)


async def _registers_only_inside_its_scope(
    http: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    scoped = bearer(token("operator", scopes={"regions": ["eu-west"]}))
    outside = await http.post(
        "/api/v1/vehicles",
        headers=scoped,
        json={"vehicles": [vehicle(f"{prefix}IN"), vehicle(f"{prefix}OUT", region="us-east")]},
    )
    body = assert_error(outside, 403, "FORBIDDEN")
    assert body["error"]["details"][0]["field"] == "vehicles.1"
    assert stored(database_url, [f"{prefix}IN", f"{prefix}OUT"]) == []
    inside = await http.post("/api/v1/vehicles", headers=scoped, json=vehicle(f"{prefix}IN"))
    assert inside.status_code == 201, inside.text


async def test_a_replay_with_the_same_key_registers_nothing_more(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    headers = {**operator, "Idempotency-Key": f"reg-{prefix}"}
    first = await http.post("/api/v1/vehicles", headers=headers, json=vehicle(f"{prefix}K"))
    replay = await http.post("/api/v1/vehicles", headers=headers, json=vehicle(f"{prefix}K"))
    assert first.status_code == replay.status_code == 201
    assert replay.json() == first.json()
    with psycopg.connect(database_url) as conn:
        audited = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'vehicle.registered' AND target_id = %s",
            (f"{prefix}K",),
        ).fetchone()
    assert audited == (1,)
