"""Dependencies of the routes: settings, the request's session (it owns the transaction) and
read connection, the Temporal client, the caller (token, roles) and who a write is by
(`actor_of`), the list queries' parameters, and what judges a write that assigns vehicles a
release (`assignment_request`: the caller, the fleet's safety defaults, the trusted release
keys, kept per keys file)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from psycopg import AsyncConnection
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.caller import bearer_token, verified_caller
from core import temporal
from core.auth import Principal, TokenVerifier
from core.db import driver_connection, session_scope
from core.errors import DependencyUnavailable, Forbidden, InvalidInput
from core.settings import Settings
from models.enums import AuditSource, Role
from models.storable import UNSTORABLE_MESSAGE, storable_text
from services.assignment import AssignmentRequest
from services.audit import Actor
from services.pagination import DEFAULT_LIMIT, MAX_LIMIT
from services.safety import SafetyDefaults
from services.signing import KeysFileTrustedKeys, TrustedKeys


class TemporalConnection:
    """Connects to Temporal on first use, so the API starts (and /readyz answers) without it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    async with asyncio.timeout(5):
                        self._client = await temporal.connect(
                            self._settings.temporal_address, self._settings.temporal_namespace
                        )
                except Exception as exc:
                    raise DependencyUnavailable("Temporal is not reachable") from exc
        return self._client


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request owns the transaction: committed at its end, rolled back on error."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with session_scope(factory) as session:
        yield session


async def get_read_connection(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    """For reads that need no transaction: a pooled connection in autocommit, psycopg's own
    (core/db.py). Never for a route that writes."""
    async with driver_connection(request.app.state.read_engine) as conn:
        yield conn


async def get_temporal(request: Request) -> Client:
    connection: TemporalConnection = request.app.state.temporal
    return await connection.get()


async def get_principal(request: Request) -> Principal:
    # A write's token was verified already by the middlewares (idempotency, rate limits).
    principal = verified_caller(request.scope)
    if principal is not None:
        request.state.principal = principal
        return principal
    token = bearer_token(request.scope)  # the one reader of the header: 401 if not one
    verifier: TokenVerifier = request.app.state.verifier
    principal = await verifier.verify(token)  # TokenError: 401
    request.state.principal = principal
    return principal


async def storable_parameters(request: Request) -> None:
    """Every query and path parameter of every route is text PostgreSQL can store
    (`models.storable`): U+0000 (`%00`) anywhere is a 422 naming the parameter, before a filter,
    a sort, a search or an id reaches a statement (where it was a 500). One check for every
    route (the app's own dependency), so no parameter is left out."""
    for kind, items in (
        ("query", request.query_params.multi_items()),
        ("path", list(request.path_params.items())),
    ):
        for name, value in items:
            if storable_text(name) and (not isinstance(value, str) or storable_text(value)):
                continue
            field = name if storable_text(name) else kind
            raise InvalidInput(
                f"invalid value for {field}",
                details=[{"field": field, "message": UNSTORABLE_MESSAGE}],
            )


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the transaction commits when the route returns, before the response is
# sent, so a client never sees a success for a write that then fails to commit.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
# Returned to the pool when the route returns, before the response is sent.
ReadConnectionDep = Annotated[AsyncConnection[Any], Depends(get_read_connection, scope="function")]
PrincipalDep = Annotated[Principal, Depends(get_principal)]

READ_ROLES = frozenset({Role.VIEWER, Role.OPERATOR})
WRITE_ROLES = frozenset({Role.OPERATOR})


def require(
    roles: frozenset[Role],
) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    async def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"the {principal.role.value} role may not do this")
        return principal

    check.allowed_roles = roles  # type: ignore[attr-defined]
    return check


ViewerDep = Annotated[Principal, Depends(require(READ_ROLES))]
OperatorDep = Annotated[Principal, Depends(require(WRITE_ROLES))]

LimitQuery = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"Page size (default {DEFAULT_LIMIT}).")
]
CursorQuery = Annotated[
    str | None, Query(max_length=1024, description="Opaque cursor: `nextCursor` of a page.")
]
SortQuery = Annotated[
    str | None, Query(max_length=64, description="`field` or `-field` (descending).")
]


def multi(values: list[str] | None) -> list[str]:
    """Repeatable and comma-separated query values alike: `?a=x&a=y` or `?a=x,y`."""
    out: list[str] = []
    for value in values or []:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def actor_of(request: Request, principal: Principal) -> Actor:
    """The caller of a write, for its audit entries."""
    return Actor(
        subject=principal.subject,
        role=principal.role.value,
        source=AuditSource.API,
        correlation_id=request.state.request_id,
    )


_trusted_keys: dict[str, KeysFileTrustedKeys] = {}


def trusted_keys_of(settings: Settings) -> TrustedKeys | None:
    """The artifact registry's trusted keys (`MOTORCADE_TRUSTED_KEYS_FILE`), or None when unset
    (then no release verifies: rollouts and desired states are refused)."""
    path = settings.trusted_keys_file
    if not path:
        return None
    keys = _trusted_keys.get(path)
    if keys is None:
        keys = _trusted_keys[path] = KeysFileTrustedKeys(path)
    return keys


def safety_defaults_of(settings: Settings) -> SafetyDefaults:
    return SafetyDefaults(
        require_stationary=settings.safety_require_stationary,
        min_battery_percent=settings.safety_min_battery_percent,
    )


def assignment_request(
    request: Request, principal: Principal, settings: Settings
) -> AssignmentRequest:
    """What a write that assigns vehicles a release (a rollout, a direct desired state) is
    judged by: its caller and the fleet's safety defaults and trusted release keys."""
    return AssignmentRequest(
        actor=actor_of(request, principal),
        scope=principal.scope,
        safety_defaults=safety_defaults_of(settings),
        trusted_keys=trusted_keys_of(settings),
    )
