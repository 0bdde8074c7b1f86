"""Probes and metrics, outside /api/v1."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from api.caller import bearer_token
from api.envelope import ok
from core.db import probe
from core.errors import NotFound, Unauthenticated
from core.settings import Settings
from models.api import Envelope, HealthOut, ReadinessOut
from models.enums import RolloutStatus
from services.rollouts import queries

router = APIRouter(tags=["operations"])

ROLLOUTS = Gauge(
    "motorcade_rollouts",
    "Rollouts by status, counted at each scrape (one GROUP BY on the rollouts' status index).",
    ["status"],
)


@router.get("/healthz", summary="Liveness: the process answers", response_model=Envelope[HealthOut])
async def healthz(request: Request) -> dict[str, object]:
    return ok(request, {"status": "ok"})


# The whole readiness check (connecting included) answers within this many seconds.
READY_TIMEOUT_SECONDS = 3.0


@router.get(
    "/readyz",
    summary="Readiness: PostgreSQL and Temporal are reachable",
    response_model=Envelope[ReadinessOut],
    responses={
        503: {"description": "a dependency is not reachable", "model": Envelope[ReadinessOut]}
    },
)
async def readyz(request: Request) -> JSONResponse:
    # PostgreSQL on a short connection of its own (never one of the request pool, so an
    # exhausted pool or a stalled database cannot hold the probe), and Temporal, checked
    # together, each bounded by READY_TIMEOUT_SECONDS connection included; and whether the
    # request pool has a connection to lend (`pool`: `ok` or `exhausted`, reported only).
    # 503 when either dependency does not answer in time. (A comment, not a docstring: the
    # OpenAPI document keeps its description.)
    settings: Settings = request.app.state.settings
    checks: dict[str, str] = {}

    async def database() -> None:
        try:
            await probe(settings.libpq_database_url, within_seconds=READY_TIMEOUT_SECONDS)
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "unavailable"

    async def temporal() -> None:
        async def check() -> None:
            client = await request.app.state.temporal.get()
            await client.service_client.check_health()

        try:
            async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                await check()
            checks["temporal"] = "ok"
        except Exception:
            checks["temporal"] = "unavailable"

    # The request pool itself: every connection (overflow included) lent out means requests
    # wait for one, then answer 503. Reported, not judged: a load spike that saturates every
    # replica's pool must not make a balancer pull them all (an outage of its own).
    pool = request.app.state.engine.pool
    capacity = 2 * settings.database_pool_size  # create_engine: as many again in overflow
    checks["pool"] = "exhausted" if pool.checkedout() >= capacity else "ok"
    probes = [database()]
    if getattr(request.app.state, "role", "api") != "ingest":  # ingest never uses Temporal
        probes.append(temporal())
    await asyncio.gather(*probes)
    healthy = all(v == "ok" for k, v in checks.items() if k != "pool")
    body = ok(request, {"status": "ok" if healthy else "unavailable", "checks": checks})
    return JSONResponse(body, status_code=200 if healthy else 503)


def check_metrics_token(request: Request) -> None:
    """/metrics is an operator endpoint with its own credential: `Authorization: Bearer
    <MOTORCADE_METRICS_TOKEN>`, compared in constant time; no user token (a viewer's sees
    fleet-wide counts) opens it. Without a configured secret the endpoint is off (404)."""
    settings: Settings = request.app.state.settings
    if settings.metrics_token is None:
        raise NotFound("/metrics is off: set MOTORCADE_METRICS_TOKEN to serve it")
    try:
        sent = bearer_token(request.scope)  # the one reader: several headers are refused
    except Unauthenticated:
        sent = None
    expected = settings.metrics_token.get_secret_value().encode()
    if sent is None or not hmac.compare_digest(sent.encode("utf-8", "replace"), expected):
        raise Unauthenticated(
            "/metrics needs the metrics secret (Authorization: Bearer "
            "<MOTORCADE_METRICS_TOKEN>), not a user token"
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics (the operators' metrics secret, not a user token)",
    response_class=Response,
    responses={
        401: {"description": "UNAUTHENTICATED: no metrics secret, or another one"},
        404: {"description": "NOT_FOUND: MOTORCADE_METRICS_TOKEN is not set (metrics off)"},
    },
)
async def metrics(request: Request) -> Response:
    check_metrics_token(request)
    if getattr(request.app.state, "role", "api") != "ingest":
        try:
            async with request.app.state.engine.connect() as conn:
                async with asyncio.timeout(3):
                    counts = await queries.count_by_status(conn)
            for status in RolloutStatus:
                ROLLOUTS.labels(status.value).set(counts.get(status, 0))
        except (SQLAlchemyError, OSError, TimeoutError):  # the database is away: the other
            pass  # metrics still answer
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
