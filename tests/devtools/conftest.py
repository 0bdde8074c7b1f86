"""Fixtures of the dev tooling's tests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from devtools import localservers


@pytest.fixture
def dev_database(database_server_url: str) -> Iterator[str]:
    """An empty database of this test's own, for a `motorcade dev` to migrate and seed."""
    name = f"motorcade_dev_{secrets.token_hex(4)}"
    yield localservers.ensure_database(database_server_url, name)
    localservers.drop_database(database_server_url, name)
