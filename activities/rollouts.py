"""The rollout workflow's activities: the only I/O on its path, all through
`services.rollout_targets`. Each activity opens one transaction (`session_scope`), is
idempotent (keyed by rollout, stage and batch, never the run id) and turns domain failures into
non-retryable `ApplicationError`s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.db import session_scope
from models.workflows import (
    ExpandTargetsInput,
    ExpandTargetsResult,
    IssueStageInput,
    IssueStageProgress,
    IssueStageResult,
    RollbackTargetsInput,
    RollbackTargetsResult,
    UpdateRolloutStatusInput,
    UpdateRolloutStatusResult,
)
from services import rollout_targets as svc

log = structlog.get_logger(__name__)

ROLLOUT_NOT_FOUND = "RolloutNotFound"
INVALID_STRATEGY = "InvalidStrategy"
INVALID_STATUS = "InvalidRolloutStatus"


class RolloutActivities:
    """Activities with their dependencies injected (a session factory), registered on the
    worker as bound methods: `worker(activities=RolloutActivities(sessions).all())`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.expand_targets,
            self.issue_stage,
            self.update_rollout_status,
            self.rollback_targets,
        ]

    @activity.defn(name="expand_targets")
    async def expand_targets(self, input: ExpandTargetsInput) -> ExpandTargetsResult:
        """Plan the rollout's stages and insert its targets (once; a re-run returns the plan)."""
        logger = log.bind(rollout_id=input.rollout_id)
        try:
            async with session_scope(self._sessions) as session:
                rollout = await svc.load_rollout(session, rollout_id=input.rollout_id)
                expansion = await svc.plan_and_expand(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ApplicationError(
                f"rollout {input.rollout_id}: invalid strategy: {exc}",
                type=INVALID_STRATEGY,
                non_retryable=True,
            ) from exc
        # svc.TargetsChanged propagates: retryable, the next attempt counts again.
        logger.info(
            "rollout.targets_expanded",
            targeted=expansion.targeted,
            per_stage=expansion.counts_per_stage,
            inserted=expansion.inserted,
        )
        return ExpandTargetsResult(
            rollout_id=input.rollout_id,
            release_version=rollout.release_version,
            targeted=expansion.targeted,
            stages=expansion.stages,
            inserted=expansion.inserted,
        )

    @activity.defn(name="issue_stage")
    async def issue_stage(self, input: IssueStageInput) -> IssueStageResult:
        """Issue the desired state to every planned vehicle of one stage, batch by batch.

        Each batch is its own transaction; after it commits the activity heartbeats its
        cursor (last vehicle id), where a retried attempt resumes. A batch re-run changes
        nothing (only `planned` targets are taken), so resuming before the cursor is safe.
        """
        logger = log.bind(rollout_id=input.rollout_id, stage=input.stage)
        info = activity.info()
        progress = IssueStageProgress()
        if info.heartbeat_details:
            try:  # details come back as plain JSON (a dict) from the converter
                progress = IssueStageProgress.model_validate(info.heartbeat_details[0])
            except ValueError:  # unreadable: start over (safe, batches are idempotent)
                progress = IssueStageProgress()
        while True:
            try:
                async with session_scope(self._sessions) as session:
                    batch = await svc.issue_stage_batch(
                        session,
                        rollout_id=input.rollout_id,
                        stage_index=input.stage_index,
                        release_version=input.release_version,
                        after_vehicle_id=progress.last_vehicle_id,
                        batch_size=input.batch_size,
                    )
                    if batch.issued:
                        snapshot = await svc.rollout_snapshot(session, rollout_id=input.rollout_id)
                        await svc.record_rollout_event(
                            session,
                            rollout_id=input.rollout_id,
                            action="rollout.batch_issued",
                            payload=snapshot,
                            audit=False,
                        )
            except svc.RolloutNotFound as exc:
                raise ApplicationError(
                    str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True
                ) from exc
            if batch.selected == 0:
                break
            progress = IssueStageProgress(
                last_vehicle_id=batch.last_vehicle_id or progress.last_vehicle_id,
                issued=progress.issued + batch.issued,
                batches=progress.batches + 1,
            )
            activity.heartbeat(progress)
            if batch.selected < input.batch_size:
                break
        async with session_scope(self._sessions) as session:
            counts = await svc.progress(session, rollout_id=input.rollout_id)
        logger.info("rollout.stage_issued", issued=progress.issued, batches=progress.batches)
        return IssueStageResult(
            stage_index=input.stage_index,
            issued=progress.issued,
            batches=progress.batches,
            counts=counts,
        )

    @activity.defn(name="update_rollout_status")
    async def update_rollout_status(
        self, input: UpdateRolloutStatusInput
    ) -> UpdateRolloutStatusResult:
        """Write the rollout's status with its audit entry and change-feed event (once)."""
        try:
            async with session_scope(self._sessions) as session:
                if input.status in ("aborted", "rolled_back"):
                    await svc.skip_planned_targets(session, rollout_id=input.rollout_id)
                changed = await svc.set_rollout_status(
                    session,
                    rollout_id=input.rollout_id,
                    status=input.status,
                    action=input.action,
                    stage=input.stage,
                    stage_index=input.stage_index,
                    status_reason=input.status_reason,
                    waiting_for=input.waiting_for,
                    actor=input.actor,
                    source=input.source,
                    reason=input.reason,
                    correlation_id=input.correlation_id,
                    audit=input.audit,
                )
                counts = await svc.progress(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        except ValueError as exc:
            raise ApplicationError(str(exc), type=INVALID_STATUS, non_retryable=True) from exc
        if changed:
            log.info(
                "rollout.status",
                rollout_id=input.rollout_id,
                status=input.status,
                stage=input.stage,
                action=input.action,
            )
        return UpdateRolloutStatusResult(changed=changed, counts=counts)

    @activity.defn(name="rollback_targets")
    async def rollback_targets(self, input: RollbackTargetsInput) -> RollbackTargetsResult:
        """Return every vehicle the rollout touched to its previous desired release, batch by
        batch (heartbeating), and mark the never-issued targets skipped."""
        reverted = 0
        try:
            async with session_scope(self._sessions) as session:
                skipped = await svc.skip_planned_targets(session, rollout_id=input.rollout_id)
            while True:
                async with session_scope(self._sessions) as session:
                    n = await svc.rollback_batch(
                        session, rollout_id=input.rollout_id, batch_size=input.batch_size
                    )
                reverted += n
                activity.heartbeat(reverted)
                if n < input.batch_size:
                    break
            async with session_scope(self._sessions) as session:
                counts = await svc.progress(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        log.info("rollout.rolled_back", rollout_id=input.rollout_id, reverted=reverted)
        return RollbackTargetsResult(reverted=reverted, skipped=skipped, counts=counts)
