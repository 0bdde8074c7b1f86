"""The worker: `RolloutWorkflow`, `ReconcileWorkflow`, `RetentionWorkflow` and their
activities on `motorcade-rollouts`.

`build_worker` wires a worker for any client and session factory (the tests use it with the
time-skipping server); `run_worker` is `motorcade worker`: connect, register the search
attributes, ensure the reconcile and retention schedules, run until SIGINT/SIGTERM or
cancellation, then shut down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import timedelta

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.worker import Worker

from activities.reconcile import ReconcileActivities
from activities.retention import RetentionActivities
from activities.rollouts import RolloutActivities
from core.db import create_engine, session_factory
from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE, connect, ensure_search_attributes
from models.defaults import DEFAULT_OFFLINE_AFTER_SECONDS
from worker.log_context import LogContextInterceptor
from worker.schedules import ensure_reconcile_schedule, ensure_retention_schedule
from workflows.reconcile import ReconcileWorkflow
from workflows.retention import RetentionWorkflow
from workflows.rollout import RolloutWorkflow

log = structlog.get_logger(__name__)

GRACEFUL_SHUTDOWN = timedelta(seconds=30)


def build_worker(
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    *,
    task_queue: str = ROLLOUT_TASK_QUEUE,
    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS,
) -> Worker:
    rollouts = RolloutActivities(sessions, offline_after_seconds=offline_after_seconds)
    return Worker(
        client,
        interceptors=[LogContextInterceptor()],  # plus the client's (tracing), inherited
        task_queue=task_queue,
        workflows=[RolloutWorkflow, ReconcileWorkflow, RetentionWorkflow],
        activities=[
            *rollouts.all(),
            *ReconcileActivities(sessions, client=client, task_queue=task_queue).all(),
            *RetentionActivities(sessions).all(),
        ],
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )


async def run_worker(settings: Settings, *, reconcile_schedule: bool | None = None) -> None:
    """Run the worker until SIGINT/SIGTERM (or cancellation).

    `reconcile_schedule`: create or update the reconcile and retention Schedules first; by
    default everywhere but `MOTORCADE_ENV=test`, so a test's worker never leaves a schedule
    behind that would mark the other tests' vehicles offline or purge their rows.
    """
    client = await connect(
        settings.temporal_address,
        settings.temporal_namespace,
        metrics_address=settings.worker_metrics_address or None,
    )
    await ensure_search_attributes(client, settings.temporal_namespace)
    if reconcile_schedule if reconcile_schedule is not None else settings.env != "test":
        await ensure_reconcile_schedule(client, settings)
        await ensure_retention_schedule(client, settings)
    engine = create_engine(settings, role="worker")  # the activities' timeouts
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        worker = build_worker(
            client,
            session_factory(engine),
            offline_after_seconds=settings.offline_after_seconds,
        )
        async with worker:
            log.info(
                "worker.started",
                task_queue=ROLLOUT_TASK_QUEUE,
                temporal=settings.temporal_address,
                namespace=settings.temporal_namespace,
            )
            await stop.wait()
            log.info("worker.stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await engine.dispose()
        log.info("worker.stopped")
