"""The app the stream tests read from (a long keep-alive, so comments do not interleave with
events) and its client (a viewer's headers: tests/api/conftest.py's `viewer`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from core.settings import Settings
from tests.api.conftest import METRICS_TOKEN, serve_app
from tests.api.stream import READ_GUARD


@pytest.fixture
def stream_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"stream_keepalive_seconds": 300, "metrics_token": SecretStr(METRICS_TOKEN)}
    )


@pytest.fixture
async def app_url(stream_settings: Settings) -> AsyncIterator[str]:
    async with serve_app(stream_settings) as url:
        yield url


@pytest.fixture
async def client(app_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=app_url, timeout=READ_GUARD) as c:
        yield c
