"""OpenTelemetry tracing: off by default, turned on by the standard `OTEL_*` variables.

`OTEL_TRACES_EXPORTER=otlp` (OTLP over HTTP/protobuf: `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, ... as the SDK reads them)
or `console` turns it on in `motorcade api`, `ingest` and `worker`; `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` name the process (default `motorcade-<role>`); `OTEL_TRACES_SAMPLER`
samples. When on, one trace follows a request through:

- the HTTP server span (api/middleware.py `TracingMiddleware`: `METHOD /route/template`,
  the path without its query string, never a header: a token or a stream ticket never
  becomes an attribute), with W3C `traceparent` taken from the caller;
- the database calls made through SQLAlchemy (statements without their parameters);
- Temporal, through the SDK's `OpenTelemetryInterceptor` on the client and (inherited from
  it) the worker: starting a workflow or sending the rollout's `control` Update from the API,
  and the workflow's handling of it in the worker, are one trace.

Nothing here runs unless tracing is on: the components ask `enabled()` when they are built.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from opentelemetry import trace

_state: dict[str, Any] = {"enabled": False}

EXPORTERS = ("otlp", "console")


def enabled() -> bool:
    return bool(_state["enabled"])


def exporter_from_env() -> str | None:
    """The exporter `OTEL_TRACES_EXPORTER` names, when it is one this build ships (else None:
    tracing stays off)."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return name if name in EXPORTERS else None


def configure_from_env(role: str) -> bool:
    """At a role's start: install the SDK's tracer provider with the exporter of
    `OTEL_TRACES_EXPORTER`; returns whether tracing is on."""
    exporter_name = exporter_from_env()
    if exporter_name is None:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from temporalio.contrib.opentelemetry import create_tracer_provider

    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"motorcade-{role}"}
    )
    # Temporal's replay-safe SDK provider: a workflow's spans are not emitted again when the
    # worker replays its history.
    provider = create_tracer_provider(resource=resource)
    exporter: SpanExporter
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    return True


def use_provider(provider: Any) -> None:
    """Trace into `provider` (from `temporalio.contrib.opentelemetry.create_tracer_provider`)
    from now on, in this process. The global provider can be set once per process; a later
    call only turns tracing on again (a test adds its own span processor to the provider
    already installed)."""
    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)
    _state["enabled"] = True


def disable() -> None:
    """Components built from now on do not trace (tests)."""
    _state["enabled"] = False


def tracer() -> trace.Tracer:
    return trace.get_tracer("motorcade")


def instrument_engine(engine: Any) -> None:
    """Database spans (kind CLIENT, children of the current span) for the statements of this
    async SQLAlchemy engine: `SELECT`, `INSERT`, ... with the statement's text, never its
    parameters."""
    if not enabled():
        return
    from sqlalchemy import event

    def before(_conn: Any, _cursor: Any, statement: str, _p: Any, context: Any, _m: Any) -> None:
        context._motorcade_span = tracer().start_span(**_statement_span(statement))

    def after(_conn: Any, _cursor: Any, _s: str, _p: Any, context: Any, _m: Any) -> None:
        span = getattr(context, "_motorcade_span", None)
        if span is not None:
            span.end()

    def failed(exception_context: Any) -> None:
        span = getattr(exception_context.execution_context, "_motorcade_span", None)
        if span is not None:
            span.set_status(
                trace.StatusCode.ERROR, type(exception_context.original_exception).__name__
            )
            span.end()

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)


def db_span(statement: str) -> Any:
    """The database span of one statement run on the driver directly (as `instrument_engine`
    names them), or a no-op context when tracing is off."""
    if not enabled():
        return contextlib.nullcontext()
    return tracer().start_as_current_span(**_statement_span(statement))


def _statement_span(statement: str) -> dict[str, Any]:
    """A database span's name (the statement's verb), kind and attributes: the statement's
    text, never its parameters."""
    return {
        "name": statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL",
        "kind": trace.SpanKind.CLIENT,
        "attributes": {"db.system.name": "postgresql", "db.query.text": statement[:2000]},
    }


def temporal_interceptors() -> list[Any]:
    """The SDK's OpenTelemetry interceptor for a Temporal client (a worker built on the
    client inherits it), or nothing when tracing is off. It parents a workflow's handling of
    a signal or an Update on the span of whoever sent it: one trace from the HTTP request to
    the workflow's handler."""
    if not enabled():
        return []
    from temporalio.contrib.opentelemetry import OpenTelemetryInterceptor

    return [OpenTelemetryInterceptor(add_temporal_spans=True)]
