"""Temporal Schedules the worker keeps in place at start, both on `motorcade-rollouts`:
`motorcade-reconcile` runs `ReconcileWorkflow` every MOTORCADE_RECONCILE_INTERVAL_SECONDS;
`motorcade-retention` runs `RetentionWorkflow` every MOTORCADE_RETENTION_INTERVAL_SECONDS
(hourly), with the retention settings of the worker that last ensured it.

(The reconcile run also starts `pending` rollouts whose workflow did not start, after
MOTORCADE_ROLLOUT_START_GRACE_SECONDS: workflows/reconcile.py.)

`ensure_*_schedule` creates a schedule, or updates it when it exists (a new interval or input
after a deploy), keeping its state: a schedule an operator paused stays paused. Overlap
policy SKIP: a slow run is never joined by a second one; catch-up is limited to one interval,
so a worker back from a long outage runs once, not a backlog.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from core.settings import Settings
from core.temporal import RECONCILE_WORKFLOW_TYPE, RETENTION_WORKFLOW_TYPE, ROLLOUT_TASK_QUEUE
from models.workflows import ReconcileInput, RetentionInput

log = structlog.get_logger(__name__)

RECONCILE_SCHEDULE_ID = "motorcade-reconcile"
# A run that has not finished by then is abandoned (the next slot starts a fresh one).
RECONCILE_RUN_TIMEOUT = timedelta(minutes=30)
RETENTION_SCHEDULE_ID = "motorcade-retention"
RETENTION_RUN_TIMEOUT = timedelta(hours=2)


async def ensure_reconcile_schedule(
    client: Client,
    settings: Settings,
    *,
    schedule_id: str = RECONCILE_SCHEDULE_ID,
    interval: timedelta | None = None,
    task_queue: str = ROLLOUT_TASK_QUEUE,
) -> None:
    """Create the reconcile schedule, or bring an existing one up to date (idempotent).
    Temporal appends each slot's time to `schedule_id` for the run's workflow id, so every run
    has a distinct workflow id (the run's idempotency key). The interval defaults to
    MOTORCADE_RECONCILE_INTERVAL_SECONDS."""
    await _ensure(
        client,
        schedule_id,
        _schedule(
            RECONCILE_WORKFLOW_TYPE,
            ReconcileInput(
                offline_after_seconds=settings.offline_after_seconds,
                start_grace_seconds=settings.rollout_start_grace_seconds,
            ),
            workflow_id=schedule_id,
            task_queue=task_queue,
            execution_timeout=RECONCILE_RUN_TIMEOUT,
            interval=interval or timedelta(seconds=settings.reconcile_interval_seconds),
            note="Marks vehicles offline, starts pending rollouts whose workflow did not start,"
            " and records desired-vs-actual drift (Motorcade).",
        ),
    )


async def ensure_retention_schedule(
    client: Client,
    settings: Settings,
    *,
    schedule_id: str = RETENTION_SCHEDULE_ID,
    interval: timedelta | None = None,
    task_queue: str = ROLLOUT_TASK_QUEUE,
) -> None:
    """Create the retention schedule, or bring an existing one up to date (idempotent): every
    MOTORCADE_RETENTION_INTERVAL_SECONDS, the retention settings as its workflow's input."""
    await _ensure(
        client,
        schedule_id,
        _schedule(
            RETENTION_WORKFLOW_TYPE,
            RetentionInput(
                change_feed_hours=settings.change_feed_retention_hours,
                timeline_days=settings.timeline_retention_days,
                audit_days=settings.audit_retention_days,
            ),
            workflow_id=schedule_id,
            task_queue=task_queue,
            execution_timeout=RETENTION_RUN_TIMEOUT,
            interval=interval or timedelta(seconds=settings.retention_interval_seconds),
            note="Deletes change-feed rows, timeline events and audit entries past their "
            "retention (Motorcade).",
        ),
    )


def _schedule(
    workflow_type: str,
    arg: object,
    *,
    workflow_id: str,
    task_queue: str,
    execution_timeout: timedelta,
    interval: timedelta,
    note: str,
) -> Schedule:
    """One workflow every `interval`, overlap SKIP, catch-up of one interval (10 s at least)."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            workflow_type,
            arg,
            id=workflow_id,
            task_queue=task_queue,
            execution_timeout=execution_timeout,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=interval)]),
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP,
            catchup_window=max(interval, timedelta(seconds=10)),
        ),
        state=ScheduleState(note=note),
    )


async def _ensure(client: Client, schedule_id: str, desired: Schedule) -> None:
    interval = desired.spec.intervals[0].every
    try:
        await client.create_schedule(schedule_id, desired)
        log.info("schedule.created", schedule_id=schedule_id, every=interval.total_seconds())
        return
    except ScheduleAlreadyRunningError:
        pass

    def update(current: ScheduleUpdateInput) -> ScheduleUpdate:
        # Keep the live state (paused by an operator, its note); replace the rest.
        desired.state = current.description.schedule.state
        return ScheduleUpdate(schedule=desired)

    await client.get_schedule_handle(schedule_id).update(update)
    log.info("schedule.updated", schedule_id=schedule_id, every=interval.total_seconds())
