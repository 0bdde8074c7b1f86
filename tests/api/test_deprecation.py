"""Deprecated operations answer with Deprecation (RFC 9745) and Sunset (RFC 8594) headers and
are marked in the OpenAPI document; checked on the real route GET /vehicles/{id}/events."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import pytest

from api.deprecation import Deprecation
from devtools.openapi import openapi_document
from tests.api.test_envelopes import assert_error
from tests.factories import insert_vehicles

SINCE = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp())
SUNSET = datetime(2027, 5, 31, tzinfo=UTC)


def assert_deprecated(response: httpx.Response, vehicle: str) -> None:
    assert response.headers["deprecation"] == f"@{SINCE}"
    assert parsedate_to_datetime(response.headers["sunset"]) == SUNSET
    assert response.headers["sunset"].endswith(" GMT")
    assert response.headers["link"] == (
        f'</api/v1/vehicles/{vehicle}/timeline>; rel="successor-version"'
    )


async def test_the_legacy_events_route_is_deprecated_and_still_answers(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    vehicle = f"{prefix}dep"
    insert_vehicles(database_url, [vehicle])
    legacy = await http.get(f"/api/v1/vehicles/{vehicle}/events", headers=viewer)
    current = await http.get(f"/api/v1/vehicles/{vehicle}/timeline", headers=viewer)
    assert legacy.status_code == current.status_code == 200, legacy.text
    assert legacy.json()["data"] == current.json()["data"]
    assert_deprecated(legacy, vehicle)
    for name in ("deprecation", "sunset", "link"):
        assert name not in current.headers  # the successor is not deprecated

    # Errors of a deprecated operation carry the headers too.
    missing = f"{prefix}none"
    response = await http.get(f"/api/v1/vehicles/{missing}/events", headers=viewer)
    assert_error(response, 404, "NOT_FOUND")
    assert_deprecated(response, missing)
    assert_error(await http.get(f"/api/v1/vehicles/{vehicle}/events"), 401, "UNAUTHENTICATED")

    # The successor link carries the id percent-encoded: a control character, a space or a
    # non-Latin-1 letter in it is the route's answer (here 404), not a broken header (500).
    for raw, encoded in (("a%0Ab", "a%0Ab"), ("a b", "a%20b"), ("%E2%82%AC", "%E2%82%AC")):
        response = await http.get(f"/api/v1/vehicles/{raw}/events", headers=viewer)
        assert_error(response, 404, "NOT_FOUND")
        assert response.headers["link"] == (
            f'</api/v1/vehicles/{encoded}/timeline>; rel="successor-version"'
        )


def test_the_openapi_document_marks_it_deprecated() -> None:
    doc = openapi_document()
    operation = doc["paths"]["/api/v1/vehicles/{vehicle_id}/events"]["get"]
    assert operation["deprecated"] is True
    assert operation["x-deprecation"] == {
        "since": "2026-11-28T00:00:00Z",
        "sunset": "2027-05-31T00:00:00Z",
        "successor": "/api/v1/vehicles/{vehicle_id}/timeline",
    }
    assert {"Deprecation", "Sunset", "Link"} <= set(operation["responses"]["200"]["headers"])
    deprecated = [
        (path, method)
        for path, operations in doc["paths"].items()
        for method, op in operations.items()
        if op.get("deprecated")
    ]
    assert deprecated == [("/api/v1/vehicles/{vehicle_id}/events", "get")]
    assert "deprecated" not in doc["paths"]["/api/v1/vehicles/{vehicle_id}/timeline"]["get"]


def test_a_deprecation_needs_aware_dates_in_order() -> None:
    with pytest.raises(ValueError):
        Deprecation(since=datetime(2027, 1, 1), sunset=datetime(2027, 6, 1))
    with pytest.raises(ValueError):
        Deprecation(since=datetime(2027, 6, 1, tzinfo=UTC), sunset=datetime(2027, 1, 1, tzinfo=UTC))
