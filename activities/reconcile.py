"""The reconcile workflow's activities, all through `services.reconcile`.

`mark_offline_vehicles` commits batch by batch (one transaction per batch of at most
`batch_size` vehicles) and heartbeats its keyset cursor, where a retried attempt resumes;
re-running a batch changes nothing (already offline vehicles are skipped).
`record_reconcile_drift` is one transaction, idempotent by its run key.
`recheck_completed_rollouts` notifies the blocked vehicles of completed rollouts whose last
heartbeat now passes the rollout's checks (inside its window): one keyset pass per rollout,
a transaction per batch; re-running it changes only what is still to change.
`start_pending_rollouts` finishes the start of every `pending` rollout past the grace period
whose workflow does not exist (through the Temporal client the worker injects), with the
same start function and conflict policies as the API: re-running it starts nothing twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.common import domain_failures, resumed_progress
from core import temporal
from core.db import session_scope
from models.workflows import (
    MarkOfflineInput,
    MarkOfflineProgress,
    MarkOfflineResult,
    RecheckCompletedInput,
    RecheckCompletedResult,
    RecordDriftInput,
    RecordDriftResult,
    StartPendingInput,
    StartPendingProgress,
    StartPendingResult,
)
from services import reconcile as svc
from services.fleet import refresh_fleet_counts
from services.rollouts import status as rollout_status
from services.rollouts import sweeps
from services.safety import SafetyGate
from workflows.policy import window_open

log = structlog.get_logger(__name__)


# RPC statuses that mean Temporal is away or busy (retry the attempt), not that it refuses.
_TEMPORAL_AWAY = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.ABORTED,
    }
)


class ReconcileActivities:
    """Activities with their session factory injected:
    `Worker(activities=ReconcileActivities(sessions).all())`."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        client: Client | None = None,
        task_queue: str = temporal.ROLLOUT_TASK_QUEUE,
    ) -> None:
        self._sessions = sessions
        # Starts pending rollouts' workflows on `task_queue` (the worker's own).
        self._client = client
        self._task_queue = task_queue

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.mark_offline_vehicles,
            self.record_reconcile_drift,
            self.recheck_completed_rollouts,
            self.start_pending_rollouts,
        ]

    @activity.defn(name="start_pending_rollouts")
    @domain_failures
    async def start_pending_rollouts(self, input: StartPendingInput) -> StartPendingResult:
        """Start the workflow of every `pending` rollout created before
        `input.created_before`, batch by batch (keyset on id, heartbeating the cursor):
        no workflow under its id, started now (USE_EXISTING / REJECT_DUPLICATE, so a start
        racing the API's is harmless); a running one, left alone (it writes `running` as soon
        as a worker runs it); a closed one (Temporal will never run this id again), the
        rollout is marked `failed` (`WORKFLOW_START_FAILED`). Temporal unreachable: the
        attempt fails and is retried (the rollouts stay `pending`, nothing is lost)."""
        if self._client is None:
            raise RuntimeError("start_pending_rollouts needs a Temporal client")
        progress = resumed_progress(StartPendingProgress)
        pending = 0
        while True:
            async with session_scope(self._sessions) as session:
                batch = await svc.pending_rollouts(
                    session,
                    created_before=input.created_before,
                    after_id=progress.after_id,
                    limit=input.batch_size,
                )
            for rollout in batch:
                pending += 1
                try:
                    await self._start_one(rollout, progress)
                except RPCError as exc:
                    if exc.status in _TEMPORAL_AWAY:
                        raise  # the attempt fails and is retried: nothing is lost
                    # One rollout Temporal refuses for good (an invalid argument, say) must
                    # not keep every later pending rollout from starting: logged, skipped.
                    log.exception("reconcile.rollout_start_error", rollout_id=rollout.id)
                progress.after_id = rollout.id
                activity.heartbeat(progress)
            if len(batch) < input.batch_size:
                break
        return StartPendingResult(
            pending=pending,
            started=progress.started,
            running=progress.running,
            refused=progress.refused,
        )

    async def _start_one(self, rollout: Any, progress: StartPendingProgress) -> None:
        """Start one pending rollout's workflow, or say why not (`start_pending_rollouts`)."""
        assert self._client is not None
        exists = await temporal.rollout_workflow_exists(self._client, rollout_id=rollout.id)
        runs = exists is None and await temporal.start_rollout_workflow(
            self._client,
            rollout_id=rollout.id,
            release_version=rollout.release_version,
            correlation_id=rollout.correlation_id,
            created_by=rollout.created_by or "unknown",
            task_queue=self._task_queue,
        )
        if runs:
            progress.started += 1
            log.warning("reconcile.rollout_started", rollout_id=rollout.id)
        elif exists:
            progress.running += 1
        else:  # closed: the id is never reused (REJECT_DUPLICATE)
            async with session_scope(self._sessions) as session:
                refused = await rollout_status.mark_start_refused(
                    session,
                    rollout_id=rollout.id,
                    why="its workflow id is held by a closed workflow",
                )
            progress.refused += int(refused)
            log.warning("reconcile.rollout_start_refused", rollout_id=rollout.id)

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
                rechecked=input.rechecked,
                started_rollouts=input.started_rollouts,
                refused_rollouts=input.refused_rollouts,
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

    @activity.defn(name="recheck_completed_rollouts")
    @domain_failures
    async def recheck_completed_rollouts(
        self, input: RecheckCompletedInput
    ) -> RecheckCompletedResult:
        """The blocked targets of every completed rollout whose maintenance window is open at
        `input.now`, judged again by its safety checks (`sweeps.recheck_blocked`, as while it
        ran): notified when their vehicle's last heartbeat passes."""
        async with session_scope(self._sessions) as session:
            candidates = await svc.rollouts_with_blocked_targets(session)
        result = RecheckCompletedResult(rollouts=len(candidates))
        for rollout_id, policy in candidates:
            if not window_open(input.now, policy.window):
                result.outside_window += 1
                continue
            safety = SafetyGate.of_policy(policy, offline_after_seconds=input.offline_after_seconds)
            changed, after = 0, ""
            while True:
                async with session_scope(self._sessions) as session:
                    batch = await sweeps.recheck_blocked(
                        session,
                        rollout_id=rollout_id,
                        now=input.now,
                        safety=safety,
                        batch_size=input.batch_size,
                        after_vehicle_id=after,
                    )
                changed, after = changed + batch.changed, batch.last_vehicle_id
                activity.heartbeat(rollout_id, after)
                if batch.done:
                    break
            if changed:
                async with session_scope(self._sessions) as session:
                    await rollout_status.publish_rollout(session, rollout_id=rollout_id)
                log.info("reconcile.blocked_rechecked", rollout_id=rollout_id, changed=changed)
            result.changed += changed
        return result
