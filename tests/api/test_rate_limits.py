"""Rate limits on writes per caller: the token bucket (a fake clock, table by table) and the
real app with a small limit (429 RATE_LIMITED with Retry-After, in the error envelope)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from api.ratelimit import TokenBucketLimiter, retry_after_header
from core.settings import Settings
from tests.api.conftest import bearer, serve_app
from tests.api.test_envelopes import assert_error
from tests.factories import insert_vehicles


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("per_minute", "burst", "steps", "expected"),
    [
        # (seconds to advance before the take, ...) -> None (allowed) or seconds to wait
        (60, 2, [0, 0, 0], [None, None, 1.0]),
        (60, 2, [0, 0, 0.5], [None, None, 0.5]),
        (60, 2, [0, 0, 1], [None, None, None]),
        (60, 2, [0, 0, 100, 0, 0], [None, None, None, None, 1.0]),  # refills to burst only
        (6, 1, [0, 0, 5], [None, 10.0, 5.0]),
        (0, 1, [0, 0, 0], [None, None, None]),  # 0: no limit
    ],
)
def test_token_bucket(
    per_minute: float, burst: int, steps: list[float], expected: list[float | None]
) -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=per_minute, burst=burst, clock=clock)
    got = []
    for step in steps:
        clock.now += step
        wait = limiter.take("alice")
        got.append(None if wait is None else round(wait, 6))
    assert got == expected


def test_token_bucket_callers_are_independent_and_idle_ones_forgotten() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=60, burst=1, clock=clock, max_callers=2)
    assert limiter.take("alice") is None
    assert limiter.take("alice") is not None
    assert limiter.take("bob") is None
    clock.now += 5  # both refilled: forgetting them changes nothing
    assert limiter.take("carol") is None
    assert len(limiter._buckets) == 1
    assert limiter.take("alice") is None


def test_token_bucket_costs_and_a_cost_larger_than_the_bucket() -> None:
    """Telemetry takes its items at once; a cost past the burst waits for a full bucket."""
    clock = FakeClock()
    limiter = TokenBucketLimiter(per_minute=60, burst=10, clock=clock)
    assert limiter.take("gw", 8) is None
    assert limiter.take("gw", 3) == 1.0  # 2 left: one more second for the third
    assert limiter.take("big", 50) is None  # capped at the burst: a full bucket pays it
    assert limiter.take("big", 50) == 10.0


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 1.01, 59.5)] == [1, 1, 1, 2, 60]


def test_default_limit_is_on() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.rate_limit_writes_per_minute > 0 and settings.rate_limit_write_burst > 0


BURST = 3


@pytest.fixture
async def limited_api(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a burst of 3 writes and a refill of one a minute (none within a test)."""
    settings = api_settings.model_copy(
        update={"rate_limit_write_burst": BURST, "rate_limit_writes_per_minute": 1}
    )
    async with (
        serve_app(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


async def test_writes_past_the_limit_are_429(limited_api: httpx.AsyncClient, token: Any) -> None:
    alice = bearer(token("operator", subject=f"alice-{uuid.uuid4()}"))
    for _ in range(BURST):
        response = await limited_api.post("/api/v1/desired-states", headers=alice, json={})
        assert_error(response, 422, "VALIDATION_ERROR")  # counted, then refused by the route
    limited = await limited_api.post("/api/v1/desired-states", headers=alice, json={})
    body = assert_error(limited, 429, "RATE_LIMITED")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert "retry" in body["error"]["message"]
    # Every write path counts for the same caller.
    other_write = await limited_api.post(
        "/api/v1/rollouts/1/pause", headers=alice, json={"reason": "x"}
    )
    assert_error(other_write, 429, "RATE_LIMITED")

    # Reads are not limited.
    for _ in range(BURST * 3):
        assert (await limited_api.get("/api/v1/releases", headers=alice)).status_code == 200

    # Another caller has its own bucket.
    bob = bearer(token("operator", subject=f"bob-{uuid.uuid4()}"))
    response = await limited_api.post("/api/v1/desired-states", headers=bob, json={})
    assert_error(response, 422, "VALIDATION_ERROR")


async def test_unauthenticated_writes_are_limited_by_address(
    limited_api: httpx.AsyncClient,
) -> None:
    for _ in range(BURST):
        response = await limited_api.post("/api/v1/desired-states", json={})
        assert_error(response, 401, "UNAUTHENTICATED")
    assert_error(await limited_api.post("/api/v1/desired-states", json={}), 429, "RATE_LIMITED")


async def test_telemetry_is_not_counted_as_writes(
    limited_api: httpx.AsyncClient, token: Any, database_url: str, prefix: str
) -> None:
    vehicle = f"{prefix}rl"
    insert_vehicles(database_url, [vehicle])
    device = bearer(token("device", vehicle_id=vehicle))
    for seq in range(1, BURST * 2 + 1):
        batch = {
            "events": [
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vehicle,
                    "seq": seq,
                    "type": "desired_notified",
                    "occurredAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                }
            ]
        }
        response = await limited_api.post("/api/v1/telemetry", headers=device, json=batch)
        assert response.status_code == 202, response.text


async def test_stream_tickets_are_not_counted_as_writes(
    limited_api: httpx.AsyncClient, token: Any
) -> None:
    """Each open stream mints a ticket every ticket lifetime (its stream ends with it): many
    tabs must neither spend the user's writes nor lose their streams to a 429."""
    carol = bearer(token("viewer", subject=f"carol-{uuid.uuid4()}"))
    for _ in range(BURST * 3):
        response = await limited_api.post("/api/v1/stream/tickets", headers=carol)
        assert response.status_code == 201, response.text
