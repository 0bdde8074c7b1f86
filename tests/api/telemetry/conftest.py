"""Fixtures of the telemetry tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.api.conftest import bearer


@pytest.fixture(scope="session")
def gateway(token: Callable[..., str]) -> dict[str, str]:
    return bearer(token("gateway"))
