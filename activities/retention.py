"""The retention workflow's activities, through `services.retention` and `services.audit`.

Each purges in batches of `batch_size` rows, one transaction per batch, heartbeats its
progress (and the timeline's partition, where a retried attempt resumes), and stops after
`max_batches` (the next scheduled run goes on): an attempt's time is bounded, the history of
a run is a few events whatever the backlog. Re-running any batch is harmless: it deletes what
is past the cutoff now."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.common import domain_failures, resumed_progress
from core.db import session_scope
from models.workflows import PurgeInput, PurgeProgress, PurgeResult
from services import audit, retention

log = structlog.get_logger(__name__)


class PurgeBatch(Protocol):
    """`services.retention.purge_change_feed_batch`, `services.audit.purge_batch`: deletes up
    to `batch` rows older than `cutoff`, returns how many it deleted."""

    async def __call__(self, session: AsyncSession, *, cutoff: datetime, batch: int) -> int: ...


class RetentionActivities:
    """Activities with their session factory injected:
    `Worker(activities=RetentionActivities(sessions).all())`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    def all(self) -> list[Callable[..., Any]]:
        return [self.purge_change_feed, self.purge_timeline, self.purge_audit_log]

    @activity.defn(name="purge_change_feed")
    @domain_failures
    async def purge_change_feed(self, input: PurgeInput) -> PurgeResult:
        return await self._purge("change_feed", input, retention.purge_change_feed_batch)

    @activity.defn(name="purge_timeline")
    @domain_failures
    async def purge_timeline(self, input: PurgeInput) -> PurgeResult:
        progress = resumed_progress(PurgeProgress)
        async with session_scope(self._sessions) as session:
            partitions = await retention.timeline_partitions(session)
        while progress.partition < len(partitions):
            if progress.batches >= input.max_batches:
                return self._done("timeline", input, progress, done=False)
            async with session_scope(self._sessions) as session:
                deleted = await retention.purge_timeline_batch(
                    session,
                    partition=partitions[progress.partition],
                    cutoff=input.cutoff,
                    batch=input.batch_size,
                )
            progress = PurgeProgress(
                partition=progress.partition + (deleted < input.batch_size),
                deleted=progress.deleted + deleted,
                batches=progress.batches + 1,
            )
            activity.heartbeat(progress)
        return self._done("timeline", input, progress, done=True)

    @activity.defn(name="purge_audit_log")
    @domain_failures
    async def purge_audit_log(self, input: PurgeInput) -> PurgeResult:
        return await self._purge("audit_log", input, audit.purge_batch)

    async def _purge(self, what: str, input: PurgeInput, purge_batch: PurgeBatch) -> PurgeResult:
        """Purge one table batch by batch until a short batch (done) or `max_batches`."""
        progress = resumed_progress(PurgeProgress)
        while progress.batches < input.max_batches:
            async with session_scope(self._sessions) as session:
                deleted = await purge_batch(session, cutoff=input.cutoff, batch=input.batch_size)
            progress = PurgeProgress(
                deleted=progress.deleted + deleted, batches=progress.batches + 1
            )
            activity.heartbeat(progress)
            if deleted < input.batch_size:
                return self._done(what, input, progress, done=True)
        return self._done(what, input, progress, done=False)

    @staticmethod
    def _done(what: str, input: PurgeInput, progress: PurgeProgress, *, done: bool) -> PurgeResult:
        log.info(
            "retention.purged",
            table=what,
            deleted=progress.deleted,
            batches=progress.batches,
            done=done,
            cutoff=input.cutoff.isoformat(),
        )
        return PurgeResult(deleted=progress.deleted, batches=progress.batches, done=done)
