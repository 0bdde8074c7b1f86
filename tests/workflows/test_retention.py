"""`RetentionWorkflow` on the time-skipping server with the real worker, over a database of
its own (it deletes by age, whatever test wrote the rows), and the retention Schedule on the
dev server."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime, timedelta

import psycopg
from temporalio.client import ScheduleActionStartWorkflow, ScheduleOverlapPolicy
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import RETENTION_WORKFLOW_TYPE
from models.workflows import RetentionInput, RetentionResult
from tests.api.stream import aged_feed_rows
from tests.factories import Sessions
from worker.main import build_worker
from worker.schedules import ensure_retention_schedule

# Each retention is set so that its cutoff is about five days before now: the workflow's
# clock is the test server's, which earlier tests may have skipped far ahead.
KEEP = timedelta(days=5)


def _seed(url: str) -> None:
    """Rows 10 days old and rows of now in the feed, the timeline and the audit log."""
    aged_feed_rows(url, [timedelta(days=10)] * 5 + [timedelta(0)] * 2)
    with psycopg.connect(url) as conn:
        for n in range(30):
            for age in (timedelta(days=10), timedelta(0)):
                conn.execute(
                    "INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at,"
                    " received_at) VALUES (%s, gen_random_uuid(), %s, 'heartbeat', now() - %s,"
                    " now() - %s)",
                    (f"car-{n}", 0 if age else 1, age, age),
                )
        for age in (timedelta(days=10),) * 3 + (timedelta(0),):
            conn.execute(
                "INSERT INTO audit_log (at, actor, source, action, target_type, result)"
                " VALUES (now() - %s, 'a', 'system', 'x', 't', 'ok')",
                (age,),
            )


def _counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM change_feed), (SELECT count(*) FROM timeline_events),"
            " (SELECT count(*) FROM audit_log)"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def test_the_retention_workflow_purges_what_is_past_each_retention(
    time_skipping_env: WorkflowEnvironment,
    own_database: str,
    own_sessions: Sessions,
    task_queue: str,
) -> None:
    _seed(own_database)
    assert _counts(own_database) == (7, 60, 4)
    ahead = await time_skipping_env.get_current_time() - datetime.now(UTC) + KEEP
    retention = RetentionInput(
        change_feed_hours=math.ceil(ahead / timedelta(hours=1)),
        timeline_days=math.ceil(ahead / timedelta(days=1)),
        audit_days=math.ceil(ahead / timedelta(days=1)),
        batch_size=4,
    )
    workflow_id = f"retention-{secrets.token_hex(4)}"
    async with build_worker(time_skipping_env.client, own_sessions, task_queue=task_queue):
        handle = await time_skipping_env.client.start_workflow(
            RETENTION_WORKFLOW_TYPE,
            retention,
            id=workflow_id,
            task_queue=task_queue,
            result_type=RetentionResult,
        )
        result = await handle.result()
    assert result.change_feed.deleted == 5
    assert result.timeline is not None and result.timeline.deleted == 30
    assert result.audit is not None and result.audit.deleted == 3
    assert _counts(own_database) == (2, 30, 1)
    # Three activities, however many batches they ran (the timeline: 16 partitions).
    assert result.timeline.batches >= 16
    events = [e async for e in handle.fetch_history_events()]
    assert len(events) < 30

    # 0 days keeps the timeline and the audit log (the feed is always purged).
    _seed(own_database)
    async with build_worker(time_skipping_env.client, own_sessions, task_queue=task_queue):
        kept = await time_skipping_env.client.execute_workflow(
            RETENTION_WORKFLOW_TYPE,
            retention.model_copy(update={"timeline_days": 0, "audit_days": 0}),
            id=f"{workflow_id}-keep",
            task_queue=task_queue,
            result_type=RetentionResult,
        )
    assert kept.timeline is None and kept.audit is None
    assert _counts(own_database)[1:] == (90, 5)


async def test_ensure_retention_schedule_creates_then_updates(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    client = dev_server_env.client
    schedule_id = f"test-retention-{secrets.token_hex(4)}"
    # A task queue no worker polls: the schedule's runs never touch the test database.
    queue = f"test-none-{secrets.token_hex(4)}"
    await ensure_retention_schedule(client, settings, schedule_id=schedule_id, task_queue=queue)
    handle = client.get_schedule_handle(schedule_id)
    try:
        described = await handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(hours=1)]
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert action.workflow == RETENTION_WORKFLOW_TYPE and action.task_queue == queue
        await handle.pause(note="maintenance")
        await ensure_retention_schedule(
            client,
            settings.model_copy(update={"retention_interval_seconds": 600}),
            schedule_id=schedule_id,
            task_queue=queue,
        )
        described = await handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(minutes=10)]
        assert described.schedule.state.paused
    finally:
        await handle.delete()
