"""One reader of the Authorization header for the whole app (api/caller.py): the middlewares
(rate limits, idempotency keys) and the routes agree on the caller, and a request carrying
more than one Authorization header is refused whatever their order."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.api.conftest import METRICS_TOKEN
from tests.api.test_envelopes import assert_error

GARBAGE = "Bearer not-a-token"


@pytest.mark.parametrize("first", ["valid", "garbage"])
@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/api/v1/vehicles", "viewer"),  # the route reads the header
        ("POST", "/api/v1/stream/tickets", "viewer"),  # a write: the middlewares read it first
        ("POST", "/api/v1/stream/tickets", "operator+viewer"),  # two valid tokens
        ("GET", "/metrics", "metrics"),  # the operators' metrics secret, outside /api/
    ],
)
async def test_two_authorization_headers_are_refused_in_either_order(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    method: str,
    path: str,
    role: str,
    first: str,
) -> None:
    if role == "operator+viewer":
        headers = [f"Bearer {token('operator')}", f"Bearer {token('viewer')}"]
    elif role == "metrics":
        headers = [f"Bearer {METRICS_TOKEN}", GARBAGE]
    else:
        headers = [f"Bearer {token(role)}", GARBAGE]
    if first == "garbage":
        headers.reverse()
    response = await http.request(
        method, path, headers=[("Authorization", value) for value in headers]
    )
    body = assert_error(response, 401, "UNAUTHENTICATED")
    if role != "metrics":  # /metrics names its own credential
        assert "one Authorization header" in body["error"]["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_one_authorization_header_still_works(
    http: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    response = await http.post(
        "/api/v1/stream/tickets", headers={"Authorization": f"Bearer {token('viewer')}"}
    )
    assert response.status_code == 201, response.text
    for bad in ("Basic abc", "Bearer", "bearer"):
        assert_error(
            await http.get("/api/v1/vehicles", headers={"Authorization": bad}),
            401,
            "UNAUTHENTICATED",
        )
