"""The `control` Update on the dev server (the time-skipping server has no Updates): accepted
transitions answer the status they lead to. The API's Updates (with its marker) are audited by
the API alone, and its invalid ones are refused by the validator at once, before anything is
written to the history; any other Update is audited by the workflow as source `temporal`, an
invalid one too (accepted, audited as refused, then failed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from core.temporal import CONTROL_REFUSED, rollout_workflow_id
from models.enums import AuditSource
from models.scope import Scope
from models.workflows import (
    ApiRequestMarker,
    ControlAction,
    ControlRequest,
    ControlResult,
    RolloutResult,
    RolloutState,
)
from services.audit import Actor
from services.rollouts import control
from tests.factories import (
    LENIENT_GATES,
    Sessions,
    fetch_all,
    fetch_one,
    fleet_rollout,
    strategy,
)
from tests.workflows.conftest import (
    Started,
    eventually,
    reporting_fleet,
    start_rollout,
    until,
)
from worker.main import build_worker

RELEASE = "2026.2.0-update"


@pytest.fixture
async def handle(
    dev_server_env: WorkflowEnvironment, sessions: Sessions, task_queue: str
) -> AsyncIterator[WorkflowHandle[Any, RolloutResult]]:
    rollout_id, prefix = await fleet_rollout(
        sessions,
        name="up",
        vehicles=20,
        release=RELEASE,
        strategy=strategy(canary_size=2, canary_bake=3600),
        gates=LENIENT_GATES,
        timeouts={"applySeconds": 86400},
    )
    async with build_worker(dev_server_env.client, sessions, task_queue=task_queue):
        h = await start_rollout(
            dev_server_env.client,
            rollout_id,
            release_version=RELEASE,
            task_queue=task_queue,
            correlation_id="req-u",
            workflow_id=rollout_workflow_id(rollout_id) + "-" + prefix,
        )
        try:
            async with reporting_fleet(sessions, Started(rollout_id, h)):  # vehicles report
                yield h
        finally:
            desc = await h.describe()
            if desc.status is not None and desc.status.name == "RUNNING":
                await h.terminate("test over")


async def _row(sessions: Sessions, handle: WorkflowHandle[Any, Any], status: str) -> dict[str, Any]:
    state = await handle.query("progress", result_type=RolloutState)
    return await eventually(
        lambda: fetch_one(
            sessions,
            "SELECT status, status_reason FROM rollouts WHERE id = :r",
            r=state.rollout_id,
        ),
        lambda row: row["status"] == status,
    )


async def _refused(handle: WorkflowHandle[Any, Any], request: ControlRequest) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await handle.execute_update("control", request, result_type=ControlResult)
    cause = err.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == CONTROL_REFUSED
    return cause.message


async def _api_marker(
    sessions: Sessions, handle: WorkflowHandle[Any, Any], action: str
) -> ApiRequestMarker:
    """What the API does before it sends its Update: the request audited and committed
    (`rollout.{action}_requested`); the marker the Update carries."""
    state = await handle.query("progress", result_type=RolloutState)
    async with session_scope(sessions) as session:
        answer = await control.request_control(
            session,
            scope=Scope(),
            rollout_id=state.rollout_id,
            action=action,
            reason="from the API",
            actor=Actor("bob", "operator", AuditSource.API),
        )
    assert answer.marker is not None
    return answer.marker


async def _operator_entries(sessions: Sessions, rollout_id: int) -> list[tuple[str, ...]]:
    """The workflow's entries for operators' actions: (action, source, actor, result)."""
    rows = await fetch_all(
        sessions,
        "SELECT action, source, actor, result FROM audit_log WHERE target_type = 'rollout'"
        " AND target_id = :t AND (action IN ('rollout.paused', 'rollout.resumed',"
        " 'rollout.aborted', 'rollout.rollback_started') OR action LIKE '%\\_refused')"
        " ORDER BY id",
        t=str(rollout_id),
    )
    return [(r["action"], r["source"], r["actor"], r["result"]) for r in rows]


async def _accepted_updates(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    )


async def test_control_update_pause_resume_abort(
    handle: WorkflowHandle[Any, RolloutResult], sessions: Sessions
) -> None:
    await until(handle, lambda s: (s.waiting_for or "").startswith("bake"))
    # From the `temporal` CLI: no marker, so the workflow audits it as source temporal,
    # whatever `source` the body claims.
    paused = await handle.execute_update(
        "control",
        ControlRequest(action="pause", reason="investigating", actor="alice", source="api"),
        result_type=ControlResult,
    )
    assert paused == ControlResult(action="pause", status="paused", paused=True)
    assert await _row(sessions, handle, "paused") == {
        "status": "paused",
        "status_reason": "OPERATOR",
    }
    # A refused Update from the CLI: accepted, audited as refused, then failed.
    assert (
        await _refused(handle, ControlRequest(action="pause", reason="again", actor="carol"))
        == "cannot pause: rollout is already paused"
    )
    # From the API (its marker: it audited the request itself).
    resumed = await handle.execute_update(
        "control",
        ControlRequest(
            action="resume",
            reason="fine",
            actor="bob",
            api_marker=await _api_marker(sessions, handle, "resume"),
        ),
        result_type=ControlResult,
    )
    assert resumed == ControlResult(action="resume", status="running", paused=False)
    # An API request that is refused: rejected by the validator (nothing reaches the history;
    # the API audits its refusal itself, `rollout.resume_rejected`).
    assert (
        await _refused(
            handle,
            ControlRequest(
                action="resume",
                reason="twice",
                api_marker=await _api_marker(sessions, handle, "resume"),
            ),
        )
        == "cannot resume: rollout is running, not paused"
    )
    aborted = await handle.execute_update(
        "control",
        ControlRequest(
            action="abort",
            reason="stop",
            actor="bob",
            api_marker=await _api_marker(sessions, handle, "abort"),
        ),
        result_type=ControlResult,
    )
    assert aborted.status == "aborted"
    result = await handle.result()
    assert result.status == "aborted"
    # The API's requests are audited once, by the API; the CLI's are audited by the workflow,
    # refused ones too.
    assert await _operator_entries(sessions, result.rollout_id) == [
        ("rollout.paused", "temporal", "alice", "ok"),
        ("rollout.pause_refused", "temporal", "carol", "refused"),
    ]
    # pause, the refused pause, resume, abort; the API's refused resume never got in.
    assert await _accepted_updates(handle) == 4


async def test_a_marker_that_proves_nothing_is_audited(
    handle: WorkflowHandle[Any, RolloutResult], sessions: Sessions
) -> None:
    """Only a marker of the API's own, recent, unused audit entry for this very action spares
    the workflow's entry: a replayed one, one of another action, or one with another nonce
    (all a CLI user could send) are audited as source temporal."""
    await until(handle, lambda s: (s.waiting_for or "").startswith("bake"))
    state = await handle.query("progress", result_type=RolloutState)

    async def control_as(
        action: ControlAction, marker: ApiRequestMarker, status: str, actor: str
    ) -> None:
        await handle.execute_update(
            "control",
            ControlRequest(action=action, reason="x", actor=actor, api_marker=marker),
            result_type=ControlResult,
        )
        await _row(sessions, handle, status)

    first_pause = await _api_marker(sessions, handle, "pause")
    await control_as("pause", first_pause, "paused", "bob")
    await control_as("resume", await _api_marker(sessions, handle, "resume"), "running", "bob")
    await control_as("pause", first_pause, "paused", "replayed")
    await control_as("resume", await _api_marker(sessions, handle, "pause"), "running", "other")
    forged = (await _api_marker(sessions, handle, "pause")).model_copy(update={"nonce": "f" * 32})
    await control_as("pause", forged, "paused", "forged")
    assert await _operator_entries(sessions, state.rollout_id) == [
        ("rollout.paused", "temporal", "replayed", "ok"),
        ("rollout.resumed", "temporal", "other", "ok"),
        ("rollout.paused", "temporal", "forged", "ok"),
    ]


async def test_control_update_refuses_invalid_transitions(
    handle: WorkflowHandle[Any, RolloutResult], sessions: Sessions
) -> None:
    assert (
        await _refused(handle, ControlRequest(action="resume", reason="not paused"))
    ).startswith("cannot resume: rollout is ")
    rolling = await handle.execute_update(
        "control", ControlRequest(action="rollback", reason="regression"), result_type=ControlResult
    )
    assert rolling.status == "rolling_back"
    # Until the rollback is done nothing else is accepted; afterwards, nothing at all.
    try:
        message = await _refused(handle, ControlRequest(action="rollback", reason="again"))
    except RPCError as closed:  # the (tiny) rollback may already be over
        assert closed.status == RPCStatusCode.NOT_FOUND
    else:
        assert message in (
            "cannot rollback: rollout is already rolling back",
            "cannot rollback: rollout is rolled_back",
        )
    result = await handle.result()
    assert result.status == "rolled_back"
    entries = await _operator_entries(sessions, result.rollout_id)
    assert entries[:2] == [
        ("rollout.resume_refused", "temporal", "temporal", "refused"),
        ("rollout.rollback_started", "temporal", "temporal", "ok"),
    ]
    # Once the workflow has closed, the server itself refuses Updates (no validator runs):
    # RPCError NOT_FOUND "workflow execution already completed". The API answers that with
    # 409 too, the rollout's status read from PostgreSQL.
    with pytest.raises(RPCError) as err:
        await handle.execute_update(
            "control", ControlRequest(action="resume", reason="late"), result_type=ControlResult
        )
    assert err.value.status == RPCStatusCode.NOT_FOUND
