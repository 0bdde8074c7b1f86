"""Temporal constants and the client, in one place for the API, the worker and the tests, and
the API's three calls into a rollout's workflow: start it, send it an operator's control, and
tell it (coalesced) that its vehicles' outcomes moved."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

import structlog
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from core import tracing
from core.aio import wait_event
from core.errors import DependencyUnavailable, InvalidStateTransition
from models.enums import RolloutStatus
from models.workflows import ControlRequest, ControlResult, OutcomesSignal, RolloutInput

log = structlog.get_logger(__name__)

ROLLOUT_TASK_QUEUE = "motorcade-rollouts"

SA_ROLLOUT_ID = SearchAttributeKey.for_keyword("RolloutId")
SA_RELEASE_VERSION = SearchAttributeKey.for_keyword("ReleaseVersion")
SA_ROLLOUT_STATUS = SearchAttributeKey.for_keyword("RolloutStatus")
SA_ROLLOUT_STAGE = SearchAttributeKey.for_keyword("RolloutStage")
SEARCH_ATTRIBUTES = (SA_ROLLOUT_ID, SA_RELEASE_VERSION, SA_ROLLOUT_STATUS, SA_ROLLOUT_STAGE)


def rollout_workflow_id(rollout_id: int | str) -> str:
    return f"rollout-{rollout_id}"


def temporal_ui_link(ui_base: str, namespace: str, workflow_id: str) -> str:
    return f"{ui_base.rstrip('/')}/namespaces/{namespace}/workflows/{workflow_id}"


def dev_server_search_attribute_flags() -> list[str]:
    """`temporal server start-dev` flags that register the search attributes at start."""
    flags: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{key.name}=Keyword"]
    return flags


async def connect(
    address: str, namespace: str = "default", *, metrics_address: str | None = None
) -> Client:
    """A client of Motorcade's Temporal namespace (pydantic payloads; the tracing interceptor
    when tracing is on). `metrics_address`: serve the SDK's Prometheus metrics there (a
    runtime of its own; workers on this client report into it)."""
    runtime = None
    if metrics_address:
        runtime = Runtime(
            telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=metrics_address))
        )
    return await Client.connect(
        address,
        namespace=namespace,
        data_converter=pydantic_data_converter,
        interceptors=tracing.temporal_interceptors(),  # a worker on this client inherits it
        runtime=runtime,
    )


async def ensure_search_attributes(client: Client, namespace: str | None = None) -> None:
    """Register the custom search attributes if missing (idempotent).

    The time-skipping test server does not implement ListSearchAttributes; there, and
    wherever listing is refused, every attribute is added and "already exists" is fine.
    """
    ns = namespace or client.namespace
    wanted = {key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=ns)
        )
        missing = {k: v for k, v in wanted.items() if k not in existing.custom_attributes}
    except RPCError as err:
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        missing = wanted
    if not missing:
        return
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=ns, search_attributes=missing)
        )
    except RPCError as err:
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise


ROLLOUT_WORKFLOW_TYPE = "RolloutWorkflow"
RECONCILE_WORKFLOW_TYPE = "ReconcileWorkflow"
RETENTION_WORKFLOW_TYPE = "RetentionWorkflow"


def initial_search_attributes(
    *, rollout_id: int, release_version: str, status: str
) -> TypedSearchAttributes:
    """The search attributes a rollout workflow starts with (the workflow keeps them current)."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(SA_ROLLOUT_ID, str(rollout_id)),
            SearchAttributePair(SA_RELEASE_VERSION, release_version),
            SearchAttributePair(SA_ROLLOUT_STATUS, status),
        ]
    )


# How long one attempt to start a rollout's workflow may take (the API's attempt and each of
# the reconcile's): past it the start is ambiguous, and the rollout stays `pending`.
START_WORKFLOW_WITHIN = timedelta(seconds=5)


async def start_rollout_workflow(
    client: Client,
    *,
    rollout_id: int,
    release_version: str,
    correlation_id: str | None,
    created_by: str,
    task_queue: str = ROLLOUT_TASK_QUEUE,
) -> bool:
    """Start workflow `rollout-{id}` on the rollouts' task queue, at most once whoever calls
    it and however often: id conflict policy USE_EXISTING (a workflow running under the id is
    left as it is: no error, no second run) and id reuse policy REJECT_DUPLICATE (a closed
    one is never run again). The API calls it once after its commit, the reconcile for every
    `pending` rollout older than MOTORCADE_ROLLOUT_START_GRACE_SECONDS.

    Returns True when the workflow runs (started now or earlier), False when its id is taken
    by a closed workflow (Temporal will never run this rollout). Raises whatever the start
    raised otherwise (Temporal unreachable, `TimeoutError` after `START_WORKFLOW_WITHIN`):
    an ambiguous outcome (the workflow may exist), so the caller leaves the rollout
    `pending` and the reconcile tries again."""
    try:
        async with asyncio.timeout(START_WORKFLOW_WITHIN.total_seconds() + 1):
            await client.start_workflow(
                ROLLOUT_WORKFLOW_TYPE,
                RolloutInput(
                    rollout_id=rollout_id,
                    release_version=release_version,
                    correlation_id=correlation_id,
                ),
                id=rollout_workflow_id(rollout_id),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=initial_search_attributes(
                    rollout_id=rollout_id,
                    release_version=release_version,
                    status=RolloutStatus.PENDING.value,
                ),
                memo={"correlationId": correlation_id, "createdBy": created_by},
                rpc_timeout=START_WORKFLOW_WITHIN,
            )
    except WorkflowAlreadyStartedError:
        return False  # closed already (a running one is USE_EXISTING's: no error)
    return True


async def rollout_workflow_exists(client: Client, *, rollout_id: int) -> bool | None:
    """Whether workflow `rollout-{id}` exists: True running, False closed, None no such
    workflow. Raises when Temporal does not answer."""
    try:
        described = await client.get_workflow_handle(rollout_workflow_id(rollout_id)).describe(
            rpc_timeout=START_WORKFLOW_WITHIN
        )
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return described.status == WorkflowExecutionStatus.RUNNING


def control_update_id(
    *, action: str, rollout_id: int, caller: str, idempotency_key: str | None
) -> str:
    """The id of the `control` Update an API request sends: Temporal answers a second Update
    with the same id (while the workflow runs) with the first one's outcome, applied once.
    From the request's Idempotency-Key when it has one, scoped to the caller, the action and
    the rollout (so one key never answers another rollout or action), hashed. Without a key
    every request is a new Update (a fresh id): an X-Request-ID is not trusted to be unique,
    and a reused one must not turn a second pause into the first one's answer."""
    if not idempotency_key:
        return f"{action}-{uuid.uuid4().hex}"
    material = f"key|{caller}|{action}|{rollout_id}|{idempotency_key}"
    return f"{action}-{hashlib.sha256(material.encode()).hexdigest()[:40]}"


# The name of the Update that controls a rollout (the API's and the CLI's way), and the type
# of the ApplicationError it fails with when the workflow refuses the action.
CONTROL_UPDATE = "control"
# The signal by which the ingest path tells a rollout that its vehicles' outcomes moved.
OUTCOMES_SIGNAL = "outcomes"
CONTROL_REFUSED = "ControlRefused"
# How long the API waits for a workflow to accept or refuse a control Update.
CONTROL_ANSWER_WITHIN = timedelta(seconds=20)


class ControlUnanswered(DependencyUnavailable):
    """The control Update got no answer: `message` says why to the client, `note` is what the
    rollout's audit log records."""

    def __init__(self, message: str, *, note: str) -> None:
        super().__init__(message)
        self.note = note


class WorkflowMissing(InvalidStateTransition):
    """The rollout's workflow does not exist (not started yet: a `pending` rollout)."""


async def control_rollout(
    connect: Callable[[], Awaitable[Client]],
    *,
    rollout_id: int,
    request: ControlRequest,
    update_id: str | None = None,
) -> ControlResult:
    """Send an operator's action to the rollout's workflow as its `control` Update (on the
    client `connect` gives) and return its answer. `update_id` (`control_update_id`): a
    retried request with the same id gets the first one's outcome, applied once. Raises
    `InvalidStateTransition` when the workflow refuses it (its validator) or is no longer
    running (`WorkflowMissing` when there is no such workflow), `ControlUnanswered` when
    Temporal did not answer, or no answer came in time."""
    try:
        client = await connect()
        async with asyncio.timeout(CONTROL_ANSWER_WITHIN.total_seconds() + 5):
            return await client.get_workflow_handle(rollout_workflow_id(rollout_id)).execute_update(
                CONTROL_UPDATE,
                request,
                id=update_id,
                result_type=ControlResult,
                rpc_timeout=CONTROL_ANSWER_WITHIN,
            )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        message = str(getattr(cause, "message", "") or cause or exc)[:500]
        raise InvalidStateTransition(
            message or "the rollout refused this action in its current state"
        ) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise WorkflowMissing(
                f"cannot {request.action} rollout {rollout_id}: its workflow is not running"
            ) from None
        if exc.status == RPCStatusCode.FAILED_PRECONDITION:
            raise InvalidStateTransition(
                f"cannot {request.action} rollout {rollout_id}: its workflow is no longer running"
            ) from None
        raise ControlUnanswered("Temporal did not answer", note="Temporal did not answer") from None
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, DependencyUnavailable):
        raise ControlUnanswered(
            "the rollout's workflow did not answer in time (is a worker running?)",
            note="no answer from the rollout's workflow in time",
        ) from None


class OutcomeSignals:
    """The API's third call into rollout workflows: the `outcomes` signal, "look again", once
    telemetry that moved a rollout's targets is committed, so its gates react in seconds
    rather than at the next gate tick.

    Coalesced per rollout: the first signal goes at once, then at most one every
    `interval_seconds` (the events in between are summed into it), so a million events make
    a handful of signals and the workflow's history stays bounded (FACTS.md: never a signal
    per event). `notify` never blocks the ingest path: a background task sends. A signal that
    cannot be sent (Temporal down, the workflow finished) is dropped: the rollout's gate tick
    looks again anyway, within a minute.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[Client]], *, interval_seconds: float = 0.5
    ) -> None:
        self._connect = connect
        self._interval = interval_seconds
        self._last: dict[int, float] = {}  # rollout -> when its last signal went (monotonic)
        self._waiting: dict[int, int] = {}  # rollout -> events not yet signalled
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def notify(self, moved: Mapping[int, int]) -> None:
        """Rollouts whose targets moved (and by how many), from the ingest path."""
        for rollout_id, count in moved.items():
            self._waiting[rollout_id] = self._waiting.get(rollout_id, 0) + count
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outcome-signals")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _due(self, now: float) -> tuple[dict[int, int], float | None]:
        """The rollouts whose signal may go now, and when the next one may (None: none
        waits)."""
        due: dict[int, int] = {}
        later: float | None = None
        for rollout_id, count in list(self._waiting.items()):
            at = self._last.get(rollout_id, 0.0) + self._interval
            if at <= now:
                due[rollout_id] = count
                del self._waiting[rollout_id]
                self._last[rollout_id] = now
            else:
                later = at if later is None else min(later, at)
        # Forget rollouts quiet for a while (bounded memory).
        for rollout_id, at in list(self._last.items()):
            if at + 10 * self._interval < now and rollout_id not in self._waiting:
                del self._last[rollout_id]
        return due, later

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, later = self._due(loop.time())
            if due:
                await asyncio.gather(*(self._send(r, n) for r, n in due.items()))
                continue
            self._wake.clear()
            timeout = None if later is None else max(0.0, later - loop.time())
            await wait_event(self._wake, timeout)

    async def _send(self, rollout_id: int, events: int) -> None:
        try:
            client = await self._connect()
            await client.get_workflow_handle(rollout_workflow_id(rollout_id)).signal(
                OUTCOMES_SIGNAL, OutcomesSignal(events=events), rpc_timeout=timedelta(seconds=5)
            )
            self.sent += 1
        except (RPCError, DependencyUnavailable, TimeoutError) as exc:
            self.dropped += 1
            log.info("outcomes signal dropped", rollout_id=rollout_id, why=type(exc).__name__)
        except Exception:  # never let one signal end the loop: the gates would go deaf
            self.dropped += 1
            log.exception("outcomes signal failed", rollout_id=rollout_id)
