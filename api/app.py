"""The FastAPI application: lifespan, middleware, error handlers, routers, OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from api.deps import TemporalConnection, ViewerDep
from api.errors import install_error_handlers
from api.middleware import RequestContextMiddleware
from api.routes import desired_states, health, releases, rollouts, vehicles
from api.routes.reports import router as reports_router
from core.auth import TokenVerifier
from core.db import create_engine, session_factory
from core.logging import configure_logging
from core.settings import Settings, get_settings

API_PREFIX = "/api/v1"
API_VERSION = "1.1.0"  # SemVer of docs/openapi.yaml: additions bump the minor version

DESCRIPTION = """\
Motorcade rolls software out to vehicle fleets safely. Every success body is
`{"data", "metadata", "timestamp"}`; every error body is
`{"error": {"code", "message", "details"}, "metadata": {"requestId"}, "timestamp"}`.
Lists use keyset pagination (`limit`, opaque `cursor`, `metadata.nextCursor`).
Every endpoint except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.temporal = TemporalConnection(settings)
        app.state.verifier = TokenVerifier(settings)
        try:
            yield
        finally:
            await app.state.verifier.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Motorcade API",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "X-Request-ID",
                "Last-Event-ID",
                "If-None-Match",
            ],
            expose_headers=[
                "X-Request-ID",
                "ETag",
                "Retry-After",
                "Location",
                "Deprecation",
                "Sunset",
            ],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)

    app.include_router(health.router)
    for router in (vehicles.router, releases.router, rollouts.router, desired_states.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(reports_router, prefix=API_PREFIX)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(_: ViewerDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(_: ViewerDep, request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Motorcade API")

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    schema["security"] = [{"bearer": []}]
    for path in ("/healthz", "/readyz"):
        for operation in schema["paths"].get(path, {}).values():
            operation["security"] = []
    app.openapi_schema = schema
    return schema
