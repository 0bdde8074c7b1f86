"""The rollout workflow's activities: the only I/O on its path, all through
`services.rollout_targets`. Each activity opens one transaction (`session_scope`), is
idempotent (keyed by rollout, stage and batch, never the run id) and turns domain failures into
non-retryable `ApplicationError`s."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.db import session_scope
from models.workflows import (
    EvaluateGatesInput,
    EvaluateGatesResult,
    ExpandTargetsInput,
    ExpandTargetsResult,
    IssueStageInput,
    IssueStageProgress,
    IssueStageResult,
    RollbackTargetsInput,
    RollbackTargetsResult,
    RolloutPolicy,
    TargetSweepInput,
    TargetSweepResult,
    UpdateRolloutStatusInput,
    UpdateRolloutStatusResult,
)
from services import rollout_targets as svc
from workflows.policy import decide

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
            self.evaluate_gates,
            self.expire_apply_timeouts,
            self.retry_failed_targets,
            self.recheck_blocked,
        ]

    @activity.defn(name="expand_targets")
    async def expand_targets(self, input: ExpandTargetsInput) -> ExpandTargetsResult:
        """Plan the rollout's stages and insert its targets (once; a re-run returns the plan)."""
        logger = log.bind(rollout_id=input.rollout_id)
        try:
            async with session_scope(self._sessions) as session:
                rollout = await svc.load_rollout(session, rollout_id=input.rollout_id)
                expansion = await svc.plan_and_expand(session, rollout_id=input.rollout_id)
                policy = await svc.load_policy(session, rollout_id=input.rollout_id)
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
            policy=policy,
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
                        issued_at=input.issued_at,
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
            after = ""
            while True:
                async with session_scope(self._sessions) as session:
                    batch = await svc.rollback_batch(
                        session,
                        rollout_id=input.rollout_id,
                        batch_size=input.batch_size,
                        stage_index=input.stage_index,
                        now=input.now,
                        after_vehicle_id=after,
                    )
                reverted += batch.changed
                after = batch.last_vehicle_id
                activity.heartbeat(reverted)
                if batch.done:
                    break
            async with session_scope(self._sessions) as session:
                counts = await svc.progress(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        log.info("rollout.rolled_back", rollout_id=input.rollout_id, reverted=reverted)
        return RollbackTargetsResult(reverted=reverted, skipped=skipped, counts=counts)

    @activity.defn(name="evaluate_gates")
    async def evaluate_gates(self, input: EvaluateGatesInput) -> EvaluateGatesResult:
        """Gate counts (the whole rollout and the stage, one GROUP BY each) and the pure
        decision of `policy.decide`. Read-only. `rollback`: the rollback's own outcomes
        (`rollback_gate_counts`), gated by the same failure threshold."""
        try:
            async with session_scope(self._sessions) as session:
                policy = await svc.load_policy(session, rollout_id=input.rollout_id)
                if input.rollback:
                    total = await svc.rollback_gate_counts(
                        session, rollout_id=input.rollout_id, stage_index=None
                    )
                    stage = await svc.rollback_gate_counts(
                        session, rollout_id=input.rollout_id, stage_index=input.stage_index
                    )
                else:
                    total = await svc.gate_counts(
                        session,
                        rollout_id=input.rollout_id,
                        stage_index=None,
                        max_attempts=policy.max_attempts,
                    )
                    stage = await svc.gate_counts(
                        session,
                        rollout_id=input.rollout_id,
                        stage_index=input.stage_index,
                        max_attempts=policy.max_attempts,
                    )
                counts = await svc.progress(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        decision = decide(
            policy=policy.gates,
            total=total,
            stage=stage,
            is_canary=input.is_canary,
            bake_done=input.bake_done,
            acknowledged_failed=input.acknowledged_failed,
            canary_forced=input.canary_forced,
        )
        # Through the SDK's meter: served with its metrics on MOTORCADE_WORKER_METRICS_ADDRESS.
        activity.metric_meter().create_counter(
            "motorcade_gate_evaluations", "Gate evaluations by decision and stage kind."
        ).with_additional_attributes(
            {
                "action": decision.action,
                "stage": "rollback" if input.rollback else "canary" if input.is_canary else "wave",
            }
        ).add(1)
        if decision.action not in ("wait", "proceed"):
            log.info(
                "rollout.gate",
                rollout_id=input.rollout_id,
                stage_index=input.stage_index,
                action=decision.action,
                reason=decision.reason,
                detail=decision.detail,
            )
        return EvaluateGatesResult(total=total, stage=stage, decision=decision, counts=counts)

    async def _sweep(
        self,
        name: str,
        input: TargetSweepInput,
        batch: Callable[[AsyncSession, RolloutPolicy, str], Awaitable[svc.SweepBatch]],
    ) -> TargetSweepResult:
        """Run a set-based sweep as one keyset pass over the rollout's targets, batch by batch
        (one transaction each, heartbeating), then publish the rollout's counters once if
        anything moved."""
        changed = 0
        after = ""
        try:
            async with session_scope(self._sessions) as session:
                policy = await svc.load_policy(session, rollout_id=input.rollout_id)
            while True:
                async with session_scope(self._sessions) as session:
                    done = await batch(session, policy, after)
                changed += done.changed
                after = done.last_vehicle_id
                activity.heartbeat(changed)
                if done.done:
                    break
            async with session_scope(self._sessions) as session:
                if changed:
                    snapshot = await svc.rollout_snapshot(session, rollout_id=input.rollout_id)
                    await svc.record_rollout_event(
                        session,
                        rollout_id=input.rollout_id,
                        action=f"rollout.{name}",
                        payload=snapshot,
                        audit=False,
                    )
                counts = await svc.progress(session, rollout_id=input.rollout_id)
        except svc.RolloutNotFound as exc:
            raise ApplicationError(str(exc), type=ROLLOUT_NOT_FOUND, non_retryable=True) from exc
        if changed:
            log.info(f"rollout.{name}", rollout_id=input.rollout_id, changed=changed)
        return TargetSweepResult(changed=changed, counts=counts)

    @activity.defn(name="expire_apply_timeouts")
    async def expire_apply_timeouts(self, input: TargetSweepInput) -> TargetSweepResult:
        """Targets notified/updating for longer than `timeouts.applySeconds` -> failed,
        APPLY_TIMEOUT."""

        async def batch(session: AsyncSession, policy: RolloutPolicy, after: str) -> svc.SweepBatch:
            return await svc.expire_apply_timeouts(
                session,
                rollout_id=input.rollout_id,
                now=input.now,
                apply_seconds=policy.apply_seconds,
                after_vehicle_id=after,
            )

        return await self._sweep("apply_timeouts_expired", input, batch)

    @activity.defn(name="retry_failed_targets")
    async def retry_failed_targets(self, input: TargetSweepInput) -> TargetSweepResult:
        """Re-issue a new desired state to targets failed for a retryable reason, attempts left
        and backoff over (idempotent: keyed by rollout and attempt)."""

        async def batch(session: AsyncSession, policy: RolloutPolicy, after: str) -> svc.SweepBatch:
            rollout = await svc.load_rollout(session, rollout_id=input.rollout_id)
            return await svc.retry_failed_targets(
                session,
                rollout_id=input.rollout_id,
                release_version=rollout.release_version,
                now=input.now,
                max_attempts=policy.max_attempts,
                backoff_seconds=policy.backoff_seconds,
                after_vehicle_id=after,
            )

        return await self._sweep("targets_retried", input, batch)

    @activity.defn(name="recheck_blocked")
    async def recheck_blocked(self, input: TargetSweepInput) -> TargetSweepResult:
        """Blocked targets whose latest heartbeat passes the safety checks -> notified."""

        async def batch(session: AsyncSession, policy: RolloutPolicy, after: str) -> svc.SweepBatch:
            return await svc.recheck_blocked(
                session,
                rollout_id=input.rollout_id,
                now=input.now,
                require_stationary=policy.require_stationary,
                min_battery_percent=policy.min_battery_percent,
                after_vehicle_id=after,
            )

        return await self._sweep("blocked_rechecked", input, batch)
