"""The real app, served by uvicorn on a loopback port, over real PostgreSQL and Temporal."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.auth import mint_dev_token
from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE
from devtools.localservers import free_port
from models.enums import Role
from services.signing import generate_signing_key, write_trusted_keys_file
from tests.factories import Sessions
from worker.main import build_worker


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    """The release-signing key the app under test trusts (see api_settings)."""
    return generate_signing_key()


# The operators' metrics secret of the app under test (MOTORCADE_METRICS_TOKEN).
METRICS_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="session")
def metrics_auth() -> dict[str, str]:
    """The headers Prometheus sends to the app under test's /metrics."""
    return {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(scope="session")
def api_settings(
    settings: Settings,
    dev_server_env: WorkflowEnvironment,
    signing_key: Ed25519PrivateKey,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    keys_file = tmp_path_factory.mktemp("trusted") / "trusted-keys.json"
    write_trusted_keys_file(keys_file, [signing_key.public_key()])
    address = dev_server_env.client.service_client.config.target_host
    return settings.model_copy(
        update={
            "temporal_address": address,
            "trusted_keys_file": str(keys_file),
            # The suite shares one app and one operator subject: a limit the suite never
            # reaches (tests/api/test_rate_limits.py serves an app with a small one).
            "rate_limit_write_burst": 100_000,
            "rate_limit_writes_per_minute": 100_000,
            # Likewise its telemetry: every test's gateway is one subject (`dev-gateway`);
            # tests/api/telemetry/test_limits.py serves apps with small telemetry limits.
            "rate_limit_device_telemetry_items_per_minute": 0,
            "rate_limit_gateway_telemetry_items_per_minute": 0,
            "metrics_token": SecretStr(METRICS_TOKEN),
        }
    )


# Holds an ingest writer in the middle of a group with events (a test's connection takes the
# lock; the group's insert into timeline_events waits for it).
HOLD_INGEST_WRITER = "LOCK TABLE timeline_events IN EXCLUSIVE MODE"


@asynccontextmanager
async def serve_app(app: Settings | FastAPI) -> AsyncIterator[str]:
    """The real app for these settings (or an app instance built by the test), served by
    uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(app) if isinstance(app, Settings) else app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def served(
    settings: Settings, *, http_timeout: float = 30, **update: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app for `settings` changed by `update` (`serve_app`), and a client on it."""
    async with (
        serve_app(settings.model_copy(update=update)) as url,
        httpx.AsyncClient(base_url=url, timeout=http_timeout) as client,
    ):
        yield client


@pytest.fixture
async def rollout_worker(
    dev_server_env: WorkflowEnvironment, sessions: Sessions
) -> AsyncIterator[None]:
    """A rollout worker on the queue the API starts workflows on (the dev server's)."""
    async with build_worker(dev_server_env.client, sessions, task_queue=ROLLOUT_TASK_QUEUE):
        yield


@pytest.fixture(scope="session")
async def api_base_url(api_settings: Settings) -> AsyncIterator[str]:
    async with serve_app(api_settings) as url:
        yield url


@pytest.fixture
async def http(api_base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def token(dev_key: str) -> Callable[..., str]:
    """token(role, **claims): a dev token for that role."""

    def make(role: str | Role, **kw: Any) -> str:
        return mint_dev_token(dev_key, role=Role(role), **kw)

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def viewer(token: Callable[..., str]) -> dict[str, str]:
    return bearer(token("viewer"))


@pytest.fixture(scope="session")
def operator(token: Callable[..., str]) -> dict[str, str]:
    return bearer(token("operator"))


@pytest.fixture
def prefix() -> str:
    """A unique vehicle-id prefix for this test's rows."""
    return f"T{secrets.token_hex(3).upper()}-"


async def all_pages(http: httpx.AsyncClient, headers: dict, url: str) -> list[dict[str, Any]]:
    """Every item of a keyset-paged list, `url` (with its query) followed cursor by cursor;
    each page is 200 and says `hasMore` exactly when it gives a next cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    sep = "&" if "?" in url else "?"
    for _ in range(1000):
        page_url = url + (f"{sep}cursor={cursor}" if cursor else "")
        response = await http.get(page_url, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["data"]
        cursor = body["metadata"]["nextCursor"]
        assert body["metadata"]["hasMore"] is (cursor is not None)
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


def samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric family in Prometheus text format."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found
