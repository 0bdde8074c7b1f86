"""`GET /me`: who the API takes the caller to be (what a dashboard asks first)."""

from __future__ import annotations

import httpx

from tests.api.test_envelopes import assert_error


async def test_me_says_who_is_calling(
    http: httpx.AsyncClient, viewer: dict, operator: dict
) -> None:
    seen = (await http.get("/api/v1/me", headers=viewer)).json()["data"]
    assert seen["subject"] == "dev-viewer" and seen["role"] == "viewer"
    assert seen["canWrite"] is False and seen["expiresAt"]
    assert seen["regions"] is None and seen["vehicleId"] is None
    assert (await http.get("/api/v1/me", headers=operator)).json()["data"]["canWrite"] is True
    assert_error(await http.get("/api/v1/me"), 401, "UNAUTHENTICATED")
