"""The FastAPI application: lifespan, middleware, error handlers, routers, OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api.authgate import AuthGateMiddleware
from api.bodylimit import BodyLimitMiddleware, document_body_limits
from api.dashboard import add_dashboard
from api.deprecation import DeprecationMiddleware, document_deprecations
from api.deps import TemporalConnection, storable_parameters
from api.errors import install_error_handlers
from api.examples import add_examples
from api.idempotency import IdempotencyMiddleware, document_idempotency, purge_loop
from api.middleware import RequestContextMiddleware, TracingMiddleware
from api.naming import operation_id, rename_schemas
from api.ratelimit import RateLimitMiddleware, TelemetryLimits, document_rate_limits
from api.routes import (
    audit,
    desired_states,
    health,
    me,
    releases,
    rollouts,
    stream,
    telemetry,
    vehicles,
)
from api.routes.reports import fleet_router
from api.routes.reports import router as reports_router
from api.schemadocs import describe_fields, describe_parameters
from api.staticfiles import WholeFiles
from core import tracing
from core.aio import stop_within
from core.auth import TokenVerifier
from core.db import autocommit_engine, connection_options, create_engine, session_factory
from core.errors import error_codes
from core.logging import configure_logging
from core.settings import Settings, get_settings
from core.temporal import OutcomeSignals
from models.telemetry import TelemetryBatch
from services.fleet import SummaryCache
from services.ingest import IngestConfig, TelemetryIngestor
from services.stream import StreamHub, ticket_secret
from services.telemetry import WideWritePolicy

API_PREFIX = "/api/v1"
API_VERSION = "1.6.0"  # SemVer of docs/openapi.yaml: additions bump the minor version

DESCRIPTION = """\
Motorcade rolls software out to vehicle fleets safely. Every success body is
`{"data", "metadata", "timestamp"}`; every error body is
`{"error": {"code", "message", "details"}, "metadata": {"requestId"}, "timestamp"}`.
Lists use keyset pagination (`limit`, opaque `cursor`, `metadata.nextCursor`).
Every endpoint except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`;
`/metrics` takes the operators' metrics secret (`MOTORCADE_METRICS_TOKEN`) instead of a JWT.
"""


CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "X-Request-ID",
    "Last-Event-ID",
    "If-None-Match",
]
CORS_EXPOSED_HEADERS = [
    "X-Request-ID",
    "ETag",
    "Retry-After",
    "Location",
    "Deprecation",
    "Sunset",
    "Link",
    "Idempotent-Replayed",
]


def ingest_config(settings: Settings) -> IngestConfig:
    return IngestConfig(
        queue_max_items=settings.ingest_queue_max_items,
        group_max_items=settings.ingest_group_max_items,
        group_wait_ms=settings.ingest_group_wait_ms,
        writers=settings.ingest_writers,
        max_clock_skew_seconds=settings.max_clock_skew_seconds,
        policy=WideWritePolicy(
            offline_after_seconds=settings.offline_after_seconds,
            refresh_seconds=settings.telemetry_refresh_seconds,
            battery_step=settings.telemetry_battery_step,
            max_seq_jump=settings.max_seq_jump,
        ),
    )


def create_app(
    settings: Settings | None = None, *, role: Literal["api", "ingest"] = "api"
) -> FastAPI:
    """The API (`motorcade api`) or the ingestion role alone (`motorcade ingest`: telemetry,
    the devices' desired state, probes and metrics)."""
    settings = settings or get_settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    app = FastAPI(
        title="Motorcade API",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=_lifespan(settings, role),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        generate_unique_id_function=operation_id,
        # FastAPI's own OpenTelemetry bridge would record each request's query string (where
        # a stream ticket travels) as soon as a tracer provider exists: our TracingMiddleware
        # makes the server span instead (core/tracing.py).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        dependencies=[Depends(storable_parameters)],  # no U+0000 in a query or path parameter
    )
    app.state.settings = settings
    app.state.role = role
    app.state.telemetry_limits = TelemetryLimits(settings)
    app.state.stream_secret = ticket_secret(
        settings.stream_ticket_secret.get_secret_value() if settings.stream_ticket_secret else None,
        settings.dev_key.get_secret_value() if settings.dev_key else None,
    )
    install_error_handlers(app)
    _add_middleware(app, settings, role)
    _include_routers(app, role, serves_ingest=_serves_ingest(settings, role))
    _add_docs(app)
    if role == "api":
        add_dashboard(app, settings, app.state.stream_secret)
    return app


def _serves_ingest(settings: Settings, role: str) -> bool:
    return role == "ingest" or settings.api_ingest


def _lifespan(
    settings: Settings, role: str
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What the app holds while it runs: the database engine and sessions, the Temporal
    connection, the token verifier; for the API the stream hub and the idempotency-key purge
    loop (the other retention runs in the worker's `motorcade-retention` Schedule); for a
    process serving ingest the telemetry ingestor and its rollouts' `outcomes` signals.
    Stopped in reverse order, each step bounded (`core.aio.stop_within`): a step that hangs is
    logged by name and left behind, and the process still exits."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings, role="ingest" if role == "ingest" else "api")
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.read_engine = autocommit_engine(engine)
        app.state.fleet_summaries = SummaryCache()
        app.state.temporal = TemporalConnection(settings)
        app.state.verifier = TokenVerifier(settings)
        app.state.ingestor = None
        app.state.stream = None
        async with contextlib.AsyncExitStack() as running:
            running.push_async_callback(stop_within, "database pool", engine.dispose)
            running.push_async_callback(stop_within, "token verifier", app.state.verifier.aclose)
            if role == "api":
                app.state.stream = StreamHub(
                    settings.libpq_database_url,
                    queue_max_events=settings.stream_queue_max_events,
                    queue_max_bytes=settings.stream_queue_max_bytes,
                    poll_seconds=settings.stream_poll_seconds,
                    options=connection_options(settings, "listen"),
                    max_per_caller=settings.stream_max_per_caller,
                    backfill_pool_size=settings.stream_backfill_pool_size,
                )
                await app.state.stream.start()
                running.push_async_callback(stop_within, "stream hub", app.state.stream.stop)
            if _serves_ingest(settings, role):
                signals = OutcomeSignals(
                    app.state.temporal.get,
                    interval_seconds=settings.outcome_signal_interval_seconds,
                )
                await signals.start()
                running.push_async_callback(stop_within, "outcome signals", signals.stop)
                app.state.ingestor = TelemetryIngestor(
                    app.state.sessions, ingest_config(settings), on_outcomes=signals.notify
                )
                await app.state.ingestor.start()
                running.push_async_callback(
                    stop_within, "telemetry ingestor", app.state.ingestor.stop
                )
            if role == "api":
                purge = asyncio.create_task(
                    purge_loop(app.state.sessions, settings.idempotency_purge_interval_seconds)
                )
                running.push_async_callback(
                    stop_within, "idempotency purge", lambda: _cancel(purge)
                )
            yield

    return lifespan


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _add_middleware(app: FastAPI, settings: Settings, role: str) -> None:
    """Outermost last: request context, CORS, deprecation headers, the body limit (before
    anything reads a body or verifies a token), the write rate limit, the auth gate (401
    before any body is read), then idempotency closest to the routes."""
    if role == "api":  # the ingest role serves no write it applies to (telemetry is exempt)
        app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(AuthGateMiddleware)
    if role == "api":
        app.add_middleware(
            RateLimitMiddleware,
            per_minute=settings.rate_limit_writes_per_minute,
            burst=settings.rate_limit_write_burst,
        )
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(DeprecationMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)
    if tracing.enabled():
        app.add_middleware(TracingMiddleware)  # outermost: the span covers the whole request


def _include_routers(app: FastAPI, role: str, *, serves_ingest: bool) -> None:
    app.include_router(health.router)
    if role == "ingest":
        app.include_router(telemetry.router, prefix=API_PREFIX)
        app.include_router(vehicles.device_router, prefix=API_PREFIX)
        return
    routers = [
        vehicles.router,
        releases.router,
        rollouts.router,
        desired_states.router,
        audit.router,
        stream.router,
        me.router,
    ]
    if serves_ingest:
        routers[1:1] = [vehicles.device_router, telemetry.router]
    for router in [*routers, fleet_router, reports_router]:
        app.include_router(router, prefix=API_PREFIX)


SWAGGER_UI = Path(__file__).parent / "static" / "swagger-ui"  # vendored: /docs works offline


def _add_docs(app: FastAPI) -> None:
    """The API's description is public (SPEC.md): `/openapi.json` and `/docs` need no token,
    and `/docs` loads Swagger UI from the app itself, never from a CDN."""

    encoded: list[bytes] = []  # the document never changes while the process runs

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> Response:
        if not encoded:  # public and about 100 KB: encoded once, not per request
            encoded.append(bytes(JSONResponse(app.openapi()).body))
        return Response(encoded[0], media_type="application/json")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Motorcade API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    app.mount("/docs/assets", WholeFiles(directory=SWAGGER_UI), name="docs-assets")

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    body = TelemetryBatch.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    schemas.update(body.pop("$defs", {}))
    schemas["TelemetryBatch"] = body
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        "metricsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The operators' metrics secret (MOTORCADE_METRICS_TOKEN), not a JWT",
        },
    }
    schema["security"] = [{"bearer": []}]
    document_idempotency(schema)
    document_rate_limits(schema)
    document_body_limits(schema)
    document_deprecations(schema)
    if f"{API_PREFIX}/stream" in schema["paths"]:
        stream.document_stream_events(schema, f"{API_PREFIX}/stream")
    for path in ("/healthz", "/readyz"):
        for operation in schema["paths"].get(path, {}).values():
            operation["security"] = []
    for operation in schema["paths"].get("/metrics", {}).values():
        operation["security"] = [{"metricsToken": []}]
    error_code = schemas["ErrorBody"]["properties"]["code"]
    error_code["enum"] = error_codes()
    error_code["description"] = "What went wrong, for a program: one of these, never another."
    rename_schemas(schema)  # plain names (`Rollout`, `RolloutPage`, `Error`): api/naming.py
    describe_fields(schema)  # a description on every field: api/schemadocs.py
    describe_parameters(schema)  # and on every parameter
    add_examples(schema)  # an example on every request and response body: api/examples.py
    app.openapi_schema = schema
    return schema
