"""`run_worker` against the local dev server: connects, registers the search attributes, runs
a rollout, stops on cancellation; its activities' log lines carry the rollout's workflow id
and correlation id."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE, ROLLOUT_WORKFLOW_TYPE, rollout_workflow_id
from models.workflows import RolloutInput, RolloutResult
from tests.factories import (
    LENIENT_GATES,
    Sessions,
    fleet_rollout,
)
from tests.workflows.conftest import Started, reporting_fleet
from worker.main import run_worker

RELEASE = "2026.2.0-worker"


async def test_run_worker_runs_a_rollout_on_the_dev_server(
    dev_server_env: WorkflowEnvironment,
    settings: Settings,
    sessions: Sessions,
    capfd: pytest.CaptureFixture[str],
) -> None:
    rollout_id, prefix = await fleet_rollout(
        sessions,
        name="wk",
        vehicles=12,
        release=RELEASE,
        strategy={
            "canary": {"size": 1, "bakeSeconds": 0},
            "waves": [{"percent": 100, "bakeSeconds": 0}],
        },
        gates=LENIENT_GATES,
    )
    config = settings.model_copy(
        update={"temporal_address": dev_server_env.client.service_client.config.target_host}
    )
    task = asyncio.create_task(run_worker(config))
    try:
        handle = await dev_server_env.client.start_workflow(
            ROLLOUT_WORKFLOW_TYPE,
            RolloutInput(
                rollout_id=rollout_id, release_version=RELEASE, correlation_id=f"corr-{prefix}"
            ),
            id=rollout_workflow_id(rollout_id) + "-" + prefix,
            task_queue=ROLLOUT_TASK_QUEUE,
            result_type=RolloutResult,
        )
        async with reporting_fleet(sessions, Started(rollout_id, handle)):  # vehicles report
            result = await handle.result()
        assert result.status == "completed" and result.counts.succeeded == 6
        out, err = capfd.readouterr()
        lines = (out + err).splitlines()
        mine = f"workflow_id={rollout_workflow_id(rollout_id)}-{prefix}"
        # Every activity line names its workflow; a status change (its input carries the
        # rollout's correlation id) names the request behind the rollout too.
        expanded = [line for line in lines if "rollout.targets_expanded" in line and mine in line]
        started = [line for line in lines if "action=rollout.started" in line and mine in line]
        assert expanded and started, (out + err)[-3000:]
        assert f"correlation_id=corr-{prefix}" in started[0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
