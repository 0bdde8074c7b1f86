"""A rollout over 90 vehicles (10% then 100%), pending, for the engine's service tests."""

from __future__ import annotations

import pytest

from tests.factories import (
    Sessions,
    make_fleet,
    make_release,
    make_rollout,
    strategy,
    unique_prefix,
)

RELEASE = "2026.2.0-svc"


@pytest.fixture
async def rollout_id(sessions: Sessions) -> int:
    prefix = unique_prefix("svc")
    await make_fleet(sessions, prefix=prefix, count=90)
    await make_release(sessions, version=RELEASE)
    return await make_rollout(
        sessions,
        release_version=RELEASE,
        targets={"regions": [prefix + "eu-west"], "models": [], "rings": None},
        strategy=strategy(canary_size=None, waves=[{"percent": 10}, {"percent": 100}]),
    )
