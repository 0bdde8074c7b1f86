"""Redaction: tokens, secrets and Authorization headers never reach a log line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.logging import REDACTED, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_sensitive_keys_are_redacted_at_any_depth() -> None:
    event = {
        "event": "request",
        "headers": {"Authorization": f"Bearer {JWT}", "Accept": "json"},
        "payload": {"nested": [{"apiKey": "s3cret", "ok": 1}], "client_secret": "x"},
        "ticket": "abc",
    }
    out = redact(event)
    assert out["headers"]["Authorization"] == REDACTED
    assert out["headers"]["Accept"] == "json"
    assert out["payload"]["nested"][0] == {"apiKey": REDACTED, "ok": 1}
    assert out["payload"]["client_secret"] == REDACTED
    assert out["ticket"] == REDACTED


def test_tokens_inside_free_text_are_redacted() -> None:
    out = redact({"event": f"failed with Bearer {JWT} and {JWT}"})
    assert JWT not in out["event"]
    assert "Bearer [REDACTED]" in out["event"]


def test_a_password_in_a_url_is_redacted() -> None:
    out = redact({"event": "connect to postgresql://motorcade:hunter2@db:5432/x failed"})
    assert out["event"] == f"connect to postgresql://motorcade:{REDACTED}@db:5432/x failed"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_an_exception_s_text_is_redacted_in_the_log_line(fmt: str) -> None:
    """The traceback is formatted before redaction runs: a token or a connection string's
    password in an exception's message (structlog's or the standard library's logger) never
    reaches the output. Run in a fresh process: logging is configured once per process."""
    script = textwrap.dedent(
        f"""
        import logging
        from core.logging import configure_logging, get_logger
        configure_logging(fmt={fmt!r}, level="INFO")
        try:
            raise RuntimeError("Bearer {JWT} at postgresql://u:hunter2@db/x")
        except RuntimeError:
            get_logger("t").exception("unhandled error")
            logging.getLogger("stdlib").exception("unhandled error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("RuntimeError") >= 2  # both tracebacks are there
    assert JWT not in done.stderr and "hunter2" not in done.stderr
