"""The rollout worker: `RolloutWorkflow` and its activities on `motorcade-rollouts`.

`build_worker` wires a worker for any client and session factory (the tests use it with the
time-skipping server); `run_worker` is `motorcade worker`: connect, register the search
attributes, run until SIGINT/SIGTERM or cancellation, then shut down gracefully.
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

from activities.rollouts import RolloutActivities
from core.db import create_engine, session_factory
from core.settings import Settings
from core.temporal import ROLLOUT_TASK_QUEUE, connect, ensure_search_attributes
from workflows.rollout import RolloutWorkflow

log = structlog.get_logger(__name__)

GRACEFUL_SHUTDOWN = timedelta(seconds=30)


def build_worker(
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    *,
    task_queue: str = ROLLOUT_TASK_QUEUE,
) -> Worker:
    activities = RolloutActivities(sessions)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[RolloutWorkflow],
        activities=activities.all(),
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )


async def run_worker(settings: Settings) -> None:
    """Run the rollout worker until SIGINT/SIGTERM (or cancellation)."""
    client = await connect(settings.temporal_address, settings.temporal_namespace)
    await ensure_search_attributes(client, settings.temporal_namespace)
    engine = create_engine(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        worker = build_worker(client, session_factory(engine))
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
