"""Who may post telemetry, and how much: a budget of items (events + heartbeats) per device
and per gateway token (429 RATE_LIMITED with Retry-After), and gateways bound to a scope
where fleet-wide gateways are not allowed (production's default). The real app, served by
uvicorn, over real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from api.app import create_app
from core.settings import Settings
from tests.api.conftest import bearer, served
from tests.api.telemetry import URL, event, event_count, heartbeat
from tests.api.test_envelopes import assert_error
from tests.factories import insert_vehicles


def events(vid: str, first_seq: int, n: int) -> list[dict]:
    return [event(vid, first_seq + i, "apply_start") for i in range(n)]


async def test_a_device_past_its_budget_is_429_and_others_are_not(
    api_settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    mine, theirs = f"{prefix}0", f"{prefix}1"
    insert_vehicles(database_url, [mine, theirs], release="1.0")
    device = bearer(token("device", vehicle_id=mine, subject=f"device-{uuid.uuid4()}"))
    async with served(
        api_settings,
        # A burst of 5 items, refilled at one a minute (nothing refills within the test).
        rate_limit_device_telemetry_items_per_minute=1,
        rate_limit_device_telemetry_burst=5,
    ) as api:
        first = await api.post(URL, json={"events": events(mine, 1, 3)}, headers=device)
        assert first.status_code == 202, first.text
        second = await api.post(
            URL,
            json={"events": events(mine, 4, 1), "heartbeats": [heartbeat(mine)]},
            headers=device,
        )
        assert second.status_code == 202, second.text  # 5 items: the whole burst
        over = await api.post(URL, json={"events": events(mine, 5, 1)}, headers=device)
        body = assert_error(over, 429, "RATE_LIMITED")
        assert int(over.headers["retry-after"]) >= 1
        assert "retry in" in body["error"]["message"] and "device" in body["error"]["message"]
        # Charged before its body is read: an empty or malformed request is limited too.
        assert_error(await api.post(URL, content=b"{", headers=device), 429, "RATE_LIMITED")
        # Another device has its own budget.
        other = bearer(token("device", vehicle_id=theirs, subject=f"device-{uuid.uuid4()}"))
        fine = await api.post(URL, json={"events": events(theirs, 1, 5)}, headers=other)
        assert fine.status_code == 202, fine.text
    assert event_count(database_url, mine) == 4  # the refused event was not stored


async def test_a_gateway_is_counted_in_items_with_its_own_budget(
    api_settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    vids = [f"{prefix}{i}" for i in range(8)]
    insert_vehicles(database_url, vids, release="1.0")
    gateway = bearer(token("gateway", subject=f"gateway-{uuid.uuid4()}"))
    async with served(
        api_settings,
        rate_limit_gateway_telemetry_items_per_minute=1,
        rate_limit_gateway_telemetry_burst=10,
        rate_limit_device_telemetry_items_per_minute=1,
        rate_limit_device_telemetry_burst=1,
    ) as api:
        beats = {"heartbeats": [heartbeat(v) for v in vids]}  # 8 items in one request
        assert (await api.post(URL, json=beats, headers=gateway)).status_code == 202
        three = {"heartbeats": [heartbeat(v) for v in vids[:3]]}
        limited = await api.post(URL, json=three, headers=gateway)
        body = assert_error(limited, 429, "RATE_LIMITED")
        assert "gateway" in body["error"]["message"] and "items" in body["error"]["message"]
        two = {"heartbeats": [heartbeat(v) for v in vids[:1]]}
        assert (await api.post(URL, json=two, headers=gateway)).status_code == 202


async def test_telemetry_documents_its_429(api_settings: Settings) -> None:
    operation = create_app(api_settings).openapi()["paths"]["/api/v1/telemetry"]["post"]
    too_many = operation["responses"]["429"]
    assert "RATE_LIMITED" in too_many["description"]
    assert "Retry-After" in too_many["headers"]


async def test_an_unscoped_gateway_is_refused_where_fleet_gateways_are_not_allowed(
    api_settings: Settings, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    inside, outside = f"{prefix}in", f"{prefix}out"
    insert_vehicles(database_url, [inside], region="eu-west", release="1.0")
    insert_vehicles(database_url, [outside], region="us-east", release="1.0")
    fleet_wide = bearer(token("gateway", subject=f"gateway-{uuid.uuid4()}"))
    scoped = bearer(
        token("gateway", subject=f"gateway-{uuid.uuid4()}", scopes={"regions": ["eu-west"]})
    )
    async with served(api_settings, allow_fleet_gateways=False) as api:
        refused = await api.post(URL, json={"events": events(inside, 1, 1)}, headers=fleet_wide)
        body = assert_error(refused, 403, "FORBIDDEN")
        assert "MOTORCADE_ALLOW_FLEET_GATEWAYS" in body["error"]["message"]
        assert event_count(database_url, inside) == 0
        # A gateway bound to a scope posts for its vehicles, and for no other.
        ok = await api.post(URL, json={"events": events(inside, 1, 1)}, headers=scoped)
        assert ok.status_code == 202, ok.text
        beyond = await api.post(URL, json={"events": events(outside, 1, 1)}, headers=scoped)
        beyond_body = assert_error(beyond, 404, "NOT_FOUND")
        assert beyond_body["error"]["details"][0]["field"] == "events.0.vehicleId"
    assert event_count(database_url, inside) == 1
    assert event_count(database_url, outside) == 0
    # Where they are allowed (dev, test, or MOTORCADE_ALLOW_FLEET_GATEWAYS=true), the
    # fleet-wide gateway posts.
    async with served(api_settings, allow_fleet_gateways=True) as api:
        allowed = await api.post(URL, json={"events": events(inside, 2, 1)}, headers=fleet_wide)
        assert allowed.status_code == 202, allowed.text
