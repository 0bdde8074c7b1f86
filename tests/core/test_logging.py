"""Redaction: tokens, secrets and Authorization headers never reach a log line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.auth import Principal
from core.logging import REDACTED, redact
from models.enums import Role
from services.stream import issue_ticket

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


def test_a_served_app_logs_no_token_from_a_header_and_no_secret_from_a_payload(
    database_url: str, dev_key: str, tmp_path: Path
) -> None:
    """`motorcade api` as a process (JSON logs at DEBUG, everything it writes captured): a
    token in the Authorization header, a stream ticket in a query string and a secret in a
    payload never reach its output, nor does a ticket it issued, while the requests do."""
    import httpx

    from core.auth import mint_dev_token
    from devtools import localservers
    from models.enums import Role

    secret = "hunter2-SECRET-in-a-payload"
    port = localservers.free_port()
    log_file = tmp_path / "api.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=str(Path(__file__).resolve().parents[2]),
            env={
                **os.environ,
                "MOTORCADE_DATABASE_URL": database_url,
                "MOTORCADE_DEV_KEY": dev_key,
                "MOTORCADE_ENV": "test",
                "MOTORCADE_LOG_LEVEL": "DEBUG",
                "MOTORCADE_LOG_FORMAT": "json",
                "MOTORCADE_TEMPORAL_ADDRESS": f"127.0.0.1:{localservers.free_port()}",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            import asyncio

            asyncio.run(localservers.wait_http_ready(base, within=60, path="/healthz"))
            operator = mint_dev_token(dev_key, role=Role.OPERATOR)
            with httpx.Client(base_url=base, timeout=30) as http:
                assert (
                    http.get(
                        "/api/v1/vehicles", headers={"Authorization": f"Bearer {JWT}"}
                    ).status_code
                    == 401
                )
                assert http.get(f"/api/v1/stream?ticket={JWT}").status_code == 401
                refused = http.post(
                    "/api/v1/releases",
                    headers={"Authorization": f"Bearer {operator}"},
                    json={"version": "x", "password": secret, "token": secret},
                )
                assert refused.status_code == 422
                refused = http.post(
                    "/api/v1/desired-states",
                    headers={"Authorization": f"Bearer {operator}"},
                    json={"vehicleIds": ["LOG-1"], "apiKey": secret},
                )
                assert refused.status_code == 422
                ticket = http.post(
                    "/api/v1/stream/tickets", headers={"Authorization": f"Bearer {operator}"}
                )
                assert ticket.status_code == 201, ticket.text
                issued = ticket.json()["data"]["ticket"]
        finally:
            localservers.stop_process(proc)
    written = log_file.read_text()
    assert '"path": "/api/v1/releases"' in written or "/api/v1/releases" in written
    assert JWT not in written and operator not in written and secret not in written
    assert issued not in written


def _log_in_a_fresh_process(body: str, fmt: str = "json", **env: str) -> str:
    """What `body` logs (stderr) under the real logging config, in a fresh process (logging is
    configured once per process)."""
    script = "from core.logging import configure_logging, get_logger\n"
    script += f"configure_logging(fmt={fmt!r}, level='INFO')\nlog = get_logger('t')\n"
    script += textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


# A stream ticket as the app issues them (its shape is what redaction must recognize).
TICKET = issue_ticket(Principal(subject="s", role=Role.VIEWER, regions=("eu-west",)), b"k" * 32)[0]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tokens_and_tickets_are_redacted_by_value_at_any_depth(fmt: str) -> None:
    """A JWT or a stream ticket under a key no rule names, in a URL's query string, in a list
    nested 40 levels deep, in an object's text: none reaches the line; the rest of the event
    does."""
    written = _log_in_a_fresh_process(
        f"""
        deep = {{"visible": "kept-1"}}
        for _ in range(40):
            deep = {{"level": [deep], "jwt": None}}
        class Url:
            def __str__(self):
                return "https://api/stream?lastEventId=3&ticket={TICKET}"
        log.info(
            "request",
            note="got {JWT} from the IdP",
            value="{TICKET}",
            url="/api/v1/stream?ticket={TICKET}&topics=vehicles",
            query="access_token={JWT}&x=1",
            deep=deep,
            obj=Url(),
            kept="kept-2",
        )
        log.info("GET /api/v1/stream?ticket={TICKET.split(".")[0]}XYZ.abc")
        """,
        fmt,
    )
    assert JWT not in written and TICKET not in written
    assert TICKET.split(".")[0] not in written and TICKET.split(".")[1] not in written
    assert "kept-2" in written and "topics=vehicles" in written and "lastEventId=3" in written
    assert "kept-1" not in written  # below the depth limit: replaced, not left raw
    assert "nested too deep" in written


def test_a_database_error_logs_no_bound_value_and_no_row(database_url: str) -> None:
    """A unique and a check violation through the app's own engine (core/db.py), logged with
    their tracebacks: neither the values bound to the statement (SQLAlchemy's `[parameters:`)
    nor PostgreSQL's DETAIL echo of the row (`Key (id)=(...)`, `Failing row contains`)
    reaches the line; the error's kind and constraint do."""
    secret = "VIN-PRIVATE-4242"
    written = _log_in_a_fresh_process(
        f"""
        import asyncio
        from sqlalchemy import text
        from core.db import create_engine

        async def main():
            engine = create_engine(url={database_url!r})
            async with engine.connect() as conn:
                await conn.execute(text(
                    "CREATE TEMP TABLE leak (id text PRIMARY KEY, n int CHECK (n > 0))"
                ))
                await conn.execute(text("INSERT INTO leak VALUES (:id, 1)"), {{"id": {secret!r}}})
                for sql, params in (
                    ("INSERT INTO leak VALUES (:id, 1)", {{"id": {secret!r}}}),
                    ("INSERT INTO leak VALUES (:id, -1)", {{"id": {secret!r} + "-2"}}),
                ):
                    try:
                        async with conn.begin_nested():
                            await conn.execute(text(sql), params)
                    except Exception:
                        log.exception("unhandled error", path="/api/v1/vehicles")
            await engine.dispose()

        asyncio.run(main())
        """
    )
    assert "UniqueViolation" in written and "CheckViolation" in written
    assert "leak_pkey" in written
    assert secret not in written, written
