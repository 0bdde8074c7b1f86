"""`ReconcileWorkflow` on the time-skipping server with the real worker, its saved histories
replayed, and the reconcile Schedule on the dev server."""

from __future__ import annotations

import os
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from temporalio.client import ScheduleActionStartWorkflow, ScheduleOverlapPolicy, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from core.settings import Settings
from core.temporal import RECONCILE_WORKFLOW_TYPE
from models.workflows import ReconcileInput, ReconcileResult
from tests.factories import LONG_AGO, Sessions, add_vehicles, statuses, unique_prefix
from worker.main import build_worker
from worker.schedules import ensure_reconcile_schedule
from workflows.reconcile import ReconcileWorkflow

# Saved runs: one from before the blocked re-check (replayed without it: workflow.patched),
# one with it. Record the latter again with MOTORCADE_RECORD_HISTORIES=1.
HISTORIES = Path(__file__).parent / "histories" / "reconcile"


async def test_reconcile_workflow_marks_offline_and_records_a_run(
    time_skipping_env: WorkflowEnvironment,
    sessions: Sessions,
    task_queue: str,
) -> None:
    prefix = unique_prefix("wf")
    async with sessions() as session:
        conn = await session.connection()
        stale = await add_vehicles(
            conn, prefix=prefix, tag="S", count=12, last_seen_at=LONG_AGO, created_at=LONG_AGO
        )
        fresh = await add_vehicles(
            conn,
            prefix=prefix,
            tag="F",
            count=3,
            last_seen_at=datetime.now(UTC),
            desired="2026.2.0",
        )
        await session.commit()
    # A cutoff around 2000-01-01: only vehicles last seen in the last century are stale. The
    # workflow's clock is the test server's, which earlier tests may have skipped far ahead.
    now = await time_skipping_env.get_current_time()
    offline_after = int((now - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds())
    workflow_id = f"reconcile-{prefix}"
    async with build_worker(time_skipping_env.client, sessions, task_queue=task_queue):
        result = await time_skipping_env.client.execute_workflow(
            RECONCILE_WORKFLOW_TYPE,
            # The same horizon for the pending-rollout start: the shared database's pending
            # rollouts belong to other tests (tests/api/test_rollout_start.py starts them).
            ReconcileInput(
                offline_after_seconds=offline_after,
                batch_size=5,
                start_grace_seconds=offline_after,
            ),
            id=workflow_id,
            task_queue=task_queue,
            result_type=ReconcileResult,
        )
    assert result.run_key.startswith(workflow_id + "@")
    assert result.marked_offline >= len(stale) and result.drifted >= len(fresh)
    if os.environ.get("MOTORCADE_RECORD_HISTORIES"):
        handle = time_skipping_env.client.get_workflow_handle(workflow_id)
        history = await handle.fetch_history()
        (HISTORIES / "reconcile_with_pending_start.json").write_text(history.to_json())
    async with sessions() as session:
        conn = await session.connection()
        got = await statuses(conn, prefix)
        assert {v for v, s in got.items() if s == "offline"} == set(stale)
        run = (
            await conn.execute(
                text(
                    "SELECT id, marked_offline, drifted, finished_at FROM reconcile_runs"
                    " WHERE run_key = :k"
                ),
                {"k": result.run_key},
            )
        ).one()
        assert run.id == result.run_id and run.finished_at is not None
        assert run.marked_offline == result.marked_offline and run.drifted == result.drifted
        mine = await conn.execute(
            text("SELECT sum(vehicles) FROM reconcile_drift WHERE run_id = :id AND region LIKE :p"),
            {"id": run.id, "p": prefix + "%"},
        )
        assert mine.scalar_one() == len(fresh)
        # The run refreshed the fleet summary's counts: they include this run's marking.
        counted = await conn.execute(
            text(
                "SELECT status, sum(vehicles) FROM fleet_counts WHERE region LIKE :p"
                " GROUP BY status"
            ),
            {"p": prefix + "%"},
        )
        assert {s: int(n) for s, n in counted} == dict(Counter(got.values()))


# Read at collection time (plain files, small).
SAVED = {path.name: path.read_text() for path in sorted(HISTORIES.glob("*.json"))}


@pytest.mark.parametrize("name", sorted(SAVED))
async def test_saved_reconcile_histories_replay(name: str) -> None:
    replayer = Replayer(workflows=[ReconcileWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(WorkflowHistory.from_json(name, SAVED[name]))


async def test_ensure_reconcile_schedule_creates_then_updates(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    client = dev_server_env.client
    schedule_id = f"test-reconcile-{secrets.token_hex(4)}"
    # A task queue no worker polls: the schedule's runs never touch the test database.
    queue = f"test-none-{secrets.token_hex(4)}"
    settings = settings.model_copy(update={"reconcile_interval_seconds": 45})
    await ensure_reconcile_schedule(client, settings, schedule_id=schedule_id, task_queue=queue)
    handle = client.get_schedule_handle(schedule_id)
    try:
        described = await handle.describe()
        spec = described.schedule.spec
        assert [i.every for i in spec.intervals] == [timedelta(seconds=45)]
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert action.workflow == RECONCILE_WORKFLOW_TYPE and action.task_queue == queue

        # An operator pauses it; a second call (a worker restart, a new interval) updates the
        # schedule without failing and keeps it paused.
        await handle.pause(note="maintenance")
        await ensure_reconcile_schedule(
            client,
            settings,
            schedule_id=schedule_id,
            task_queue=queue,
            interval=timedelta(seconds=120),
        )
        described = await handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(seconds=120)]
        assert described.schedule.state.paused
    finally:
        await handle.delete()
