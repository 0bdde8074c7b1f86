"""The envelopes, the error handling and the request id, through the real app over HTTP."""

from __future__ import annotations

import re

import httpx

from tests.factories import insert_vehicles

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "metadata", "timestamp"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert isinstance(body["error"]["details"], list)
    assert body["metadata"]["requestId"] == response.headers["x-request-id"]
    assert ISO_Z.match(body["timestamp"])
    assert "Traceback" not in response.text and "sqlalchemy" not in response.text.lower()
    return body


async def test_healthz_needs_no_token(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["data"] == {"status": "ok"}


async def test_readyz_checks_database_and_temporal(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["data"]["checks"] == {"database": "ok", "temporal": "ok", "pool": "ok"}


async def test_success_envelope(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    insert_vehicles(database_url, [f"{prefix}1"], release="2026.01.0")
    response = await http.get(f"/api/v1/vehicles/{prefix}1", headers=viewer)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"data", "metadata", "timestamp"}
    assert ISO_Z.match(body["timestamp"])
    vehicle = body["data"]
    assert vehicle["id"] == f"{prefix}1"
    assert vehicle["desired"]["releaseVersion"] == "2026.01.0"
    assert vehicle["actual"] == {"releaseVersion": "2026.01.0"}
    assert vehicle["status"] == "in_sync"
    assert vehicle["reasonCodes"] == []
    assert ISO_Z.match(vehicle["lastSeenAt"])


async def test_request_id_is_echoed_or_generated(http: httpx.AsyncClient, viewer: dict) -> None:
    response = await http.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = await http.get("/healthz")
    assert re.match(r"^[0-9a-f-]{36}$", generated.headers["x-request-id"])
    # A hostile value is replaced, not echoed.
    odd = await http.get("/healthz", headers={"X-Request-ID": "x" * 300})
    assert odd.headers["x-request-id"] != "x" * 300


async def test_no_token_is_401(http: httpx.AsyncClient) -> None:
    for path in ("/api/v1/vehicles", "/api/v1/releases", "/metrics"):
        assert_error(await http.get(path), 401, "UNAUTHENTICATED")
    response = await http.get("/api/v1/vehicles", headers={"Authorization": "Basic abc"})
    assert_error(response, 401, "UNAUTHENTICATED")


async def test_viewer_post_is_403(http: httpx.AsyncClient, viewer: dict) -> None:
    response = await http.post("/api/v1/rollouts", headers=viewer, json={})
    assert_error(response, 403, "FORBIDDEN")


async def test_device_cannot_list_vehicles(http: httpx.AsyncClient, token) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token('device', vehicle_id='V1')}"}
    assert_error(await http.get("/api/v1/vehicles", headers=headers), 403, "FORBIDDEN")


async def test_unknown_route_and_method(http: httpx.AsyncClient, viewer: dict) -> None:
    assert_error(await http.get("/api/v1/nope", headers=viewer), 404, "NOT_FOUND")
    assert_error(await http.delete("/api/v1/vehicles", headers=viewer), 405, "METHOD_NOT_ALLOWED")


async def test_405_allow_names_every_method_of_the_path(
    http: httpx.AsyncClient, viewer: dict
) -> None:
    """GET and POST /api/v1/vehicles are two routes; `Allow` names both (schemathesis ST205)."""
    response = await http.options("/api/v1/vehicles", headers=viewer)
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}
    response = await http.put("/api/v1/rollouts/1/pause", headers=viewer)
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "POST"


async def test_malformed_json_is_422(http: httpx.AsyncClient, operator: dict) -> None:
    response = await http.post(
        "/api/v1/rollouts",
        headers={**operator, "Content-Type": "application/json"},
        content=b'{"releaseVersion": ',
    )
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert "JSON" in body["error"]["message"]


async def test_invalid_body_names_the_field(http: httpx.AsyncClient, operator: dict) -> None:
    response = await http.post(
        "/api/v1/rollouts",
        headers=operator,
        json={
            "releaseVersion": "2026.01.0",
            "targets": {"regions": ["eu-west"]},
            "strategy": {"canary": {"size": 1}, "waves": [{"percent": 50}]},
        },
    )
    body = assert_error(response, 422, "VALIDATION_ERROR")
    fields = [d["field"] for d in body["error"]["details"]]
    assert "strategy.waves" in fields
    assert any("100" in d["message"] for d in body["error"]["details"])


async def test_bad_query_parameters_are_422(http: httpx.AsyncClient, viewer: dict) -> None:
    for query, field in (
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("status=sleeping", "status"),
        ("sort=color", "sort"),
        ("cursor=not-a-cursor", "cursor"),
        ("reasonCode=bad-code", "reasonCode"),
        ("rolloutId=abc", "rolloutId"),
    ):
        response = await http.get(f"/api/v1/vehicles?{query}", headers=viewer)
        body = assert_error(response, 422, "VALIDATION_ERROR")
        assert body["error"]["details"][0]["field"] == field, query


async def test_unknown_vehicle_is_404(http: httpx.AsyncClient, viewer: dict) -> None:
    assert_error(await http.get("/api/v1/vehicles/NOPE-0", headers=viewer), 404, "NOT_FOUND")


async def test_metrics_with_the_metrics_secret(http: httpx.AsyncClient, metrics_auth: dict) -> None:
    await http.get("/healthz")
    response = await http.get("/metrics", headers=metrics_auth)
    assert response.status_code == 200
    assert "motorcade_http_requests_total" in response.text
    assert 'route="/healthz"' in response.text
