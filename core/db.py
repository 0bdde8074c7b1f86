"""The async database engine and sessions (SQLAlchemy over psycopg 3).

The request owns the transaction: `session_scope` commits at the end or rolls back on error;
services only flush.

The dashboard's hot reads (one vehicle, the vehicle list, a timeline, the fleet summary) skip
the ORM: `driver_connection` lends a pooled connection in autocommit (no BEGIN and COMMIT
round trips) as psycopg's own connection, and `fetch` runs one statement on it. The ORM's
execution machinery was more than half of the API's CPU on those routes. Telemetry ingestion
(binary COPY) reaches the psycopg connection under its session with `session_driver`; both
unwrap it with `driver_of`.

Every connection carries the timeouts of its process's role (`connection_options`):
`statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout`, sent in the
startup packet (libpq `options=-c ...`), so a stuck statement, a lock wait or a forgotten
transaction ends instead of holding a pooled connection forever (docs/architecture.md,
"Database timeouts"). A request that waits longer than `MOTORCADE_DATABASE_POOL_TIMEOUT_SECONDS`
for a pooled connection fails at once. `database_unavailable` names those failures (and a lost
connection): the API answers them 503 `UNAVAILABLE` with `Retry-After`.

A request holding an `Idempotency-Key` (api/idempotency.py) marks its key executed inside its
own transaction (`idempotency_guard`, a `before_commit` hook on every session): the work and
the mark commit together, so a retry never runs committed work again, and a request whose key
was taken over by a retry (the fence) cannot commit at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import psycopg.types.json
import sqlalchemy.exc
import structlog
from psycopg.rows import dict_row
from pydantic_core import from_json
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from core import tracing
from core.errors import IdempotencyKeyInUse
from core.settings import Settings, normalize_database_url

log = structlog.stdlib.get_logger("motorcade.db")

# The role of a process's connections: each gets its own timeouts (`connection_options`).
# `listen` is the stream's LISTEN connection (idle outside a transaction by design: no idle
# timeout applies to it, and it runs no statement that could hang); `migrate` is unbounded.
ConnectionRole = Literal["api", "ingest", "worker", "listen", "migrate"]

# json/jsonb values are parsed by pydantic's (Rust) parser, not the json module: the same
# values, a fraction of the CPU on a page of vehicles with their metadata.
psycopg.types.json.set_json_loads(from_json)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def role_timeouts(settings: Settings, role: ConnectionRole) -> dict[str, int]:
    """The server-side timeouts (milliseconds, 0 = none) of a connection of `role`."""
    idle = _ms(settings.database_idle_in_transaction_timeout_seconds)
    if role == "api":
        statement = settings.database_api_statement_timeout_seconds
        lock = settings.database_api_lock_timeout_seconds
    elif role == "ingest":
        statement = settings.database_ingest_statement_timeout_seconds
        lock = settings.database_ingest_lock_timeout_seconds
    elif role == "worker":
        statement = settings.database_worker_statement_timeout_seconds
        lock = settings.database_worker_lock_timeout_seconds
    elif role == "listen":
        statement, lock, idle = settings.database_api_statement_timeout_seconds, 0, 0
    else:
        return {"statement_timeout": 0, "lock_timeout": 0, "idle_in_transaction_session_timeout": 0}
    return {
        "statement_timeout": _ms(statement),
        "lock_timeout": _ms(lock),
        "idle_in_transaction_session_timeout": idle,
    }


def connection_options(settings: Settings, role: ConnectionRole) -> str:
    """libpq `options` setting the role's timeouts for the whole session."""
    return " ".join(f"-c {name}={value}" for name, value in role_timeouts(settings, role).items())


def create_engine(
    settings: Settings | None = None,
    *,
    url: str | None = None,
    role: ConnectionRole = "api",
    pool_size: int | None = None,
) -> AsyncEngine:
    """The process's engine: its pool (`pool_size` connections plus as many overflow,
    `MOTORCADE_DATABASE_POOL_TIMEOUT_SECONDS` of wait at most) and its role's timeouts."""
    target = normalize_database_url(url) if url else settings.database_url if settings else None
    if target is None:
        raise ValueError("create_engine needs settings or a url")
    pool = pool_size or (settings.database_pool_size if settings else 5)
    engine = create_async_engine(
        target,
        pool_size=pool,
        max_overflow=pool,
        pool_timeout=settings.database_pool_timeout_seconds if settings else 30,
        connect_args={"options": connection_options(settings, role)} if settings else {},
        pool_pre_ping=False,
        pool_recycle=1800,
        # A failed statement's error (logged, and kept from the client) never carries the
        # values bound to it: a vehicle id, a reason, a token hash (core/logging.py redacts
        # PostgreSQL's own DETAIL echo of a row besides).
        hide_parameters=True,
    )
    tracing.instrument_engine(engine)  # database spans when tracing is on
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def session_scope(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction: commit on success, roll back on any error."""
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def probe(conninfo: str, *, within_seconds: float) -> None:
    """Reach PostgreSQL on a connection of its own, opened and closed here, the whole of it
    (connecting included) bounded by `within_seconds` (the readiness probe: it never waits
    for, nor takes, a connection of the request pool)."""
    whole = max(1, int(within_seconds))

    async def check() -> None:
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            autocommit=True,
            connect_timeout=whole,
            options=f"-c statement_timeout={_ms(within_seconds)}",
        )
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()

    async with asyncio.timeout(within_seconds):
        await check()


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, its connections lent in autocommit: for reads only."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# SQLSTATEs of a lost connection: class 08 (connection exception) and the server shutting
# down (57P01-57P03); a client-side failure has none.
LOST_CONNECTION_STATES = ("57P01", "57P02", "57P03")
TRANSIENT_REFUSALS = ("the database system is", "too many clients", "remaining connection slots")


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (psycopg's, or SQLAlchemy's wrapping one) says the connection to
    PostgreSQL was lost or refused for a transient reason: worth a retry elsewhere."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return bool(exc.connection_invalidated) or (
            exc.orig is not None and connection_lost(exc.orig)
        )
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        if state is None:  # raised by the client: a broken connection, or one not made
            text = str(exc)
            # The server refused it: a missing database or role is configuration (a 500),
            # a server starting, stopping or full is transient.
            return "FATAL:" not in text or any(t in text for t in TRANSIENT_REFUSALS)
        return state.startswith("08") or state in LOST_CONNECTION_STATES
    return False


# SQLSTATEs of a database too slow to answer in time: a statement cancelled by
# statement_timeout (57014, query_canceled), a lock not granted within lock_timeout (55P03,
# lock_not_available), a transaction idle past idle_in_transaction_session_timeout (25P03).
TIMEOUT_STATES = ("57014", "55P03", "25P03")


def database_unavailable(exc: BaseException) -> str | None:
    """Why `exc` says the database cannot serve now (a retry later may succeed): `lost` (the
    connection broke or was refused, `connection_lost`), `timeout` (a statement or lock
    timeout), `pool` (no pooled connection within the pool timeout); None for anything
    else (a bug or a refusal stays what it is)."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # QueuePool: no connection in time
        return "pool"
    if type(exc).__name__ == "PoolTimeout":  # psycopg_pool's, should one ever be used
        return "pool"
    if connection_lost(exc):
        return "lost"
    if sqlstate_of(exc) in TIMEOUT_STATES:
        return "timeout"
    return None


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, raised by psycopg on its own connection (the
    telemetry path's driver statements) or wrapped by SQLAlchemy (the ORM's); None for any
    other error."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        exc = exc.orig if exc.orig is not None else exc
    return exc.sqlstate if isinstance(exc, psycopg.Error) else None


async def driver_of(conn: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under a SQLAlchemy connection, in whatever transaction that
    connection has open: the one way to reach the driver (binary results, COPY)."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None  # a checked-out connection always has one
    return driver


async def session_driver(session: AsyncSession) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under `session`, in the session's own transaction (what it
    writes commits or rolls back with the session)."""
    return await driver_of(await session.connection())


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection of `engine` as psycopg's own, returned to the pool at the end."""
    async with engine.connect() as conn:
        driver = await driver_of(conn)
        try:
            yield driver
        except psycopg.OperationalError:
            if driver.closed:
                await conn.invalidate()  # broken (the server went away): never pooled again
            raise


async def fetch(
    conn: psycopg.AsyncConnection[Any], statement: str, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The rows of one statement (psycopg placeholders, `%(name)s`) as dicts, in a database
    span when tracing is on. Results come in binary (no text parsing of timestamps and
    arrays); psycopg prepares a statement it has run five times."""
    with tracing.db_span(statement):
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(statement, params, binary=True)
            return await cur.fetchall()


@dataclass
class IdempotencyGuard:
    """The Idempotency-Key a request holds (api/idempotency.py), and what the route says it
    created (`note_created`): marked executed in every transaction the request commits."""

    caller: str
    key: str
    token: uuid.UUID
    resource: str | None = None
    status: int | None = None
    executed: bool = False


_GUARD: ContextVar[IdempotencyGuard | None] = ContextVar("motorcade_idempotency", default=None)


@contextmanager
def _guarded_by(guard: IdempotencyGuard | None) -> Iterator[None]:
    reset = _GUARD.set(guard)
    try:
        yield
    finally:
        _GUARD.reset(reset)


@contextmanager
def idempotency_guard(guard: IdempotencyGuard) -> Iterator[IdempotencyGuard]:
    """While the request runs under its key: every commit marks the key executed."""
    with _guarded_by(guard):
        yield guard


@contextmanager
def unmarked() -> Iterator[None]:
    """Commits inside do not mark the request's key executed: bookkeeping that is no part of
    the request's work (a control's `requested` audit entry, committed before the Update is
    sent: the Update's id, not the key's mark, makes its retry safe)."""
    with _guarded_by(None):
        yield


def note_created(resource: str, *, status: int = 201) -> None:
    """A route names what its request creates (the path a GET re-reads, and the status it
    answers), before it commits: a retry whose first response was lost (the process died
    after the commit) answers `status` with that resource instead of running again. Outside
    a keyed request it does nothing."""
    guard = _GUARD.get()
    if guard is not None:
        guard.resource, guard.status = resource, status


# The one statement that marks a key executed (the columns of services/idempotency.py).
MARK_EXECUTED = text(
    "UPDATE idempotency_keys SET executed_at = coalesce(executed_at, now()),"
    " resource = coalesce(CAST(:resource AS text), resource),"
    " response_status = coalesce(CAST(:status AS smallint), response_status)"
    " WHERE caller = :caller AND key = :key AND token = :token AND state = 'in_flight'"
)


@event.listens_for(Session, "before_commit")
def _mark_key_executed(session: Session) -> None:
    """Inside the committing transaction: mark the request's key executed (with what it
    created). No row matches when a retry took the key over (the fence): the commit fails,
    so the request that lost its key writes nothing."""
    guard = _GUARD.get()
    if guard is None:
        return
    result = session.execute(
        MARK_EXECUTED,
        {
            "caller": guard.caller,
            "key": guard.key,
            "token": guard.token,
            "resource": guard.resource,
            "status": guard.status,
        },
    )
    if not getattr(result, "rowcount", 0):
        log.warning("idempotency: the key was taken over; this request's work is rolled back")
        raise IdempotencyKeyInUse(
            "this request's Idempotency-Key was taken over by a retry; nothing was written"
        )
    guard.executed = True
