"""The `control` Update on the dev server (the time-skipping server has no Updates): accepted
transitions answer the status they lead to; invalid ones are refused by the validator at once,
before anything is written to the history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from core.temporal import rollout_workflow_id
from models.enums import AuditSource
from models.workflows import ControlRequest, ControlResult, RolloutResult, RolloutState
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
    assert isinstance(cause, ApplicationError) and cause.type == "ValueError"
    return cause.message


async def test_control_update_pause_resume_abort(
    handle: WorkflowHandle[Any, RolloutResult], sessions: Sessions
) -> None:
    await until(handle, lambda s: (s.waiting_for or "").startswith("bake"))
    # From the `temporal` CLI (no source given): the workflow audits it.
    paused = await handle.execute_update(
        "control",
        ControlRequest(action="pause", reason="investigating", actor="alice"),
        result_type=ControlResult,
    )
    assert paused == ControlResult(action="pause", status="paused", paused=True)
    assert await _row(sessions, handle, "paused") == {
        "status": "paused",
        "status_reason": "OPERATOR",
    }

    assert (
        await _refused(handle, ControlRequest(action="pause", reason="again"))
        == "cannot pause: rollout is already paused"
    )
    # From the API (source "api"), which audits its own requests.
    resumed = await handle.execute_update(
        "control",
        ControlRequest(action="resume", reason="fine", source=AuditSource.API),
        result_type=ControlResult,
    )
    assert resumed == ControlResult(action="resume", status="running", paused=False)
    assert (
        await _refused(handle, ControlRequest(action="resume", reason="twice"))
        == "cannot resume: rollout is running, not paused"
    )
    aborted = await handle.execute_update(
        "control",
        ControlRequest(action="abort", reason="stop", actor="bob", source=AuditSource.API),
        result_type=ControlResult,
    )
    assert aborted.status == "aborted"
    result = await handle.result()
    assert result.status == "aborted"
    # The API audits its own requests (source "api"): the workflow does not audit them again;
    # the CLI's pause is audited by the workflow, as source temporal.
    audit = await fetch_all(
        sessions,
        "SELECT action, source, actor FROM audit_log WHERE target_type = 'rollout'"
        " AND target_id = :t"
        " AND action IN ('rollout.paused', 'rollout.resumed', 'rollout.aborted')",
        t=str(result.rollout_id),
    )
    assert audit == [{"action": "rollout.paused", "source": "temporal", "actor": "alice"}]


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
    # Once the workflow has closed, the server itself refuses Updates (no validator runs):
    # RPCError NOT_FOUND "workflow execution already completed". The API answers that with
    # 409 too, the rollout's status read from PostgreSQL.
    with pytest.raises(RPCError) as err:
        await handle.execute_update(
            "control", ControlRequest(action="resume", reason="late"), result_type=ControlResult
        )
    assert err.value.status == RPCStatusCode.NOT_FOUND
