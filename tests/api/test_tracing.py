"""OpenTelemetry: one trace from `POST /rollouts/{id}/pause` to the workflow's handling of it.

The real SDK with an in-memory exporter; the app (with tracing on) served by uvicorn; a real
worker on the dev server, on a client built by `core.temporal.connect` (so it carries the
SDK's tracing interceptor, as `motorcade worker` does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.contrib.opentelemetry import ReplaySafeTracerProvider, create_tracer_provider

from core import tracing
from core.db import create_engine, session_factory
from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE, connect
from tests.api.conftest import serve_app
from tests.api.test_rollout_control import create_rollout, wait_for_status
from tests.factories import Sessions
from worker.main import build_worker


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on (as OTEL_TRACES_EXPORTER does at a role's start), into memory; off again for
    the components later tests build."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, ReplaySafeTracerProvider):
        provider = create_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        exporter.shutdown()


@pytest.fixture
async def traced(
    spans: InMemorySpanExporter, api_settings: Settings, sessions: Sessions
) -> AsyncIterator[httpx.AsyncClient]:
    """The app and a worker, both built while tracing is on."""
    client = await connect(api_settings.temporal_address)
    worker_engine = create_engine(api_settings)
    try:
        async with build_worker(
            client, session_factory(worker_engine), task_queue=ROLLOUT_TASK_QUEUE
        ):
            async with serve_app(api_settings) as base:
                async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                    yield http
    finally:
        await worker_engine.dispose()


def descends_from(
    span: ReadableSpan, ancestor: ReadableSpan, by_id: dict[int, ReadableSpan]
) -> bool:
    parent = span.parent
    while parent is not None:
        if parent.span_id == ancestor.context.span_id:
            return True
        above = by_id.get(parent.span_id)
        parent = above.parent if above is not None else None
    return False


async def test_pause_is_one_trace_from_the_request_to_the_workflow(
    spans: InMemorySpanExporter,
    traced: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rid = await create_rollout(traced, operator, database_url, signing_key, prefix)
    await wait_for_status(traced, viewer, rid, "running")

    response = await traced.post(
        f"/api/v1/rollouts/{rid}/pause?ticket=not-a-secret-but-a-query",
        headers={
            **operator,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        json={"reason": "tracing"},
    )
    assert response.status_code == 202, response.text
    await wait_for_status(traced, viewer, rid, "paused")

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    servers = [s for s in finished if s.name == "POST /rollouts/{rollout_id}/pause"]
    assert len(servers) == 1, sorted({s.name for s in finished})
    server = servers[0]
    # The caller's trace continues: W3C traceparent taken in.
    assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert server.kind == trace.SpanKind.SERVER
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/rollouts/{rollout_id}/pause"
    assert server.attributes["url.path"] == f"/api/v1/rollouts/{rid}/pause"
    assert server.attributes["http.response.status_code"] == 202
    # Nothing of the headers or the query string (a token, a stream ticket) is recorded.
    recorded = " ".join(str(v) for s in finished for v in (s.attributes or {}).values())
    assert "not-a-secret-but-a-query" not in recorded and "Bearer" not in recorded, recorded
    assert operator["Authorization"].split()[-1] not in recorded

    in_trace = [s for s in finished if s.context.trace_id == server.context.trace_id]
    database = [s for s in in_trace if (s.attributes or {}).get("db.system.name") == "postgresql"]
    assert database and all(descends_from(s, server, by_id) for s in database)
    handled = [s for s in in_trace if s.name == "HandleUpdate:control"]
    assert handled, sorted(s.name for s in in_trace)
    # The workflow's handling of the pause, in the worker, descends from the request's span.
    assert all(descends_from(s, server, by_id) for s in handled)

    # Finish the workflow while its worker runs: a workflow evicted at shutdown ends its
    # interceptor's span in another context (a logged "Failed to detach context").
    aborted = await traced.post(
        f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "done tracing"}
    )
    assert aborted.status_code == 202, aborted.text
    await wait_for_status(traced, viewer, rid, "aborted")


def test_tracing_is_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.exporter_from_env() is None
    assert tracing.configure_from_env("api") is False and not tracing.enabled()
    assert tracing.temporal_interceptors() == []
    for value, expected in (
        ("otlp", "otlp"),
        ("Console", "console"),
        ("none", None),
        ("zipkin", None),
    ):
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
        assert tracing.exporter_from_env() == expected
