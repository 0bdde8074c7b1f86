"""Request context as pure ASGI middleware: X-Request-ID accepted or generated, echoed,
bound to every log line; HTTP metrics by route template; a last-resort 500 envelope; and,
when tracing is on (core/tracing.py), the request's server span."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from opentelemetry import propagate, trace
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.caller import send_error
from core.errors import MotorcadeError
from core.tracing import tracer

log = structlog.stdlib.get_logger("motorcade.api")

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

HTTP_REQUESTS = Counter(
    "motorcade_http_requests_total",
    "HTTP requests by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "motorcade_http_request_duration_seconds",
    "HTTP request latency by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class HttpMiddleware:
    """Pure ASGI middleware acting on HTTP requests only: anything else (lifespan) passes
    through; subclasses implement `handle`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


# The status counted and logged for a request whose client hung up before its answer
# (nginx's "client closed request"): neither the client's error nor the server's.
CLIENT_GONE = 499


class RequestContextMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = incoming if VALID_REQUEST_ID.match(incoming) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=request_id, method=scope["method"], path=scope["path"]
        )
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500, "started": False, "gone": False}

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not status_holder["started"]:
                # The client hung up before its answer (mid-body): whatever the app makes of
                # the cut body (a 422, an exception) is no answer to anyone. Counted 499.
                status_holder["gone"] = True
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = (
                    CLIENT_GONE if status_holder["gone"] else message["status"]
                )
                status_holder["started"] = True
                headers = list(message.get("headers") or [])
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            if status_holder["gone"]:
                # No answer to send; a real bug meeting the hang-up still shows its traceback.
                status_holder["status"] = CLIENT_GONE
                log.info("client disconnected before its answer", exc_info=True)
            else:
                log.exception("unhandled error")
                if not status_holder["started"]:
                    await send_error(scope, send_wrapper, MotorcadeError())
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            HTTP_REQUESTS.labels(scope["method"], route, str(status_holder["status"])).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(elapsed)
            log.info(
                "request",
                status=status_holder["status"],
                route=route,
                duration_ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()


class TracingMiddleware(HttpMiddleware):
    """The HTTP server span of each request (only installed when tracing is on): named
    `METHOD /route/template` once routed, parented by the caller's W3C `traceparent`. Its
    attributes are the method, the path without the query string (a stream ticket travels
    there), the route template, the status and the request id: never a header."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers") or []
            if k in (b"traceparent", b"tracestate")
        }
        method = scope["method"]
        with tracer().start_as_current_span(
            method,
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = _route_template(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                request_id = (scope.get("state") or {}).get("request_id")
                if request_id:
                    span.set_attribute("motorcade.request_id", request_id)
