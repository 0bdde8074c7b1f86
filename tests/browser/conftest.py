"""Browser tests: Debian's `chromium`, headless. Without it they are left out, and the end of
the run says so plainly (a skip is not a pass)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LEFT_OUT = "browser test left out: chromium not installed"

_left_out: list[str] = []


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        pytest.skip(LEFT_OUT)
    return CHROMIUM


def pytest_runtest_logreport(report: Any) -> None:
    if report.skipped and LEFT_OUT in str(report.longrepr):
        _left_out.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _left_out:
        terminalreporter.write_sep("=", LEFT_OUT, yellow=True, bold=True)
        for nodeid in _left_out:
            terminalreporter.write_line(f"{LEFT_OUT}: {nodeid}")


# The dashboard's tests drive the real app with a real rollout worker: the API suite's fixtures.
from tests.api.conftest import (  # noqa: E402, F401
    api_base_url,
    api_settings,
    http,
    metrics_auth,
    operator,
    prefix,
    rollout_worker,
    signing_key,
    token,
    viewer,
)
from tests.api.test_dashboard import issuer  # noqa: E402, F401
