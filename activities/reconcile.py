"""The reconcile workflow's activities, all through `services.reconcile`.

`mark_offline_vehicles` commits batch by batch (one transaction per batch of at most
`batch_size` vehicles) and heartbeats its keyset cursor, where a retried attempt resumes;
re-running a batch changes nothing (already offline vehicles are skipped).
`record_reconcile_drift` is one transaction, idempotent by its run key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.common import domain_failures, resumed_progress
from core.db import session_scope
from models.workflows import (
    MarkOfflineInput,
    MarkOfflineProgress,
    MarkOfflineResult,
    RecordDriftInput,
    RecordDriftResult,
)
from services import reconcile as svc
from services.fleet import refresh_fleet_counts

log = structlog.get_logger(__name__)


class ReconcileActivities:
    """Activities with their session factory injected:
    `Worker(activities=ReconcileActivities(sessions).all())`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    def all(self) -> list[Callable[..., Any]]:
        return [self.mark_offline_vehicles, self.record_reconcile_drift]

    @activity.defn(name="mark_offline_vehicles")
    @domain_failures
    async def mark_offline_vehicles(self, input: MarkOfflineInput) -> MarkOfflineResult:
        progress = resumed_progress(MarkOfflineProgress)
        while True:
            async with session_scope(self._sessions) as session:
                batch = await svc.mark_offline_batch(
                    session,
                    cutoff=input.cutoff,
                    after_key=progress.after_key,
                    after_id=progress.after_id,
                    batch_size=input.batch_size,
                )
            progress = MarkOfflineProgress(
                after_key=batch.last_key or progress.after_key,
                after_id=batch.last_id or progress.after_id,
                marked=progress.marked + batch.marked,
                batches=progress.batches + 1,
            )
            activity.heartbeat(progress)
            if batch.scanned < input.batch_size:
                break
        log.info(
            "reconcile.offline_marked",
            marked=progress.marked,
            batches=progress.batches,
            cutoff=input.cutoff.isoformat(),
        )
        return MarkOfflineResult(marked=progress.marked, batches=progress.batches)

    @activity.defn(name="record_reconcile_drift")
    @domain_failures
    async def record_reconcile_drift(self, input: RecordDriftInput) -> RecordDriftResult:
        async with session_scope(self._sessions) as session:
            run = await svc.record_drift(
                session,
                run_key=input.run_key,
                marked_offline=input.marked_offline,
                cutoff=input.cutoff,
            )
        # The fleet summary's materialization, refreshed once per run (after the offline
        # marking, so the counts include it); its own transaction, short lock on two tables.
        async with session_scope(self._sessions) as session:
            refresh_seconds = await refresh_fleet_counts(session)
        log.info(
            "reconcile.drift_recorded",
            run_id=run.run_id,
            fleet_counts_seconds=round(refresh_seconds, 3),
            run_key=run.run_key,
            drifted=run.drifted,
            groups=run.groups,
            created=run.created,
        )
        return RecordDriftResult(
            run_id=run.run_id,
            run_key=run.run_key,
            drifted=run.drifted,
            groups=run.groups,
            created=run.created,
        )
