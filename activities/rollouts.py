"""The rollout workflow's activities: the only I/O on its path, all through
`services.rollouts`. Each opens its own transactions (`session_scope`), is idempotent (keyed
by rollout, stage and batch, never the run id) and ends with a non-retryable
`ApplicationError` on a domain failure (`activities.common.domain_failures`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.common import domain_failures, resumed_progress
from core.db import session_scope
from models.defaults import DEFAULT_OFFLINE_AFTER_SECONDS
from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus, StatusReason
from models.workflows import (
    EvaluateGatesInput,
    EvaluateGatesResult,
    ExpandTargetsInput,
    ExpandTargetsResult,
    GateAction,
    GateCounts,
    GateDecision,
    IssueStageInput,
    IssueStageProgress,
    IssueStageResult,
    RecordControlRefusalsInput,
    RecordControlRefusalsResult,
    RollbackTargetsInput,
    RollbackTargetsResult,
    RolloutCounts,
    RolloutPolicy,
    TargetSweepInput,
    TargetSweepResult,
    UpdateRolloutStatusInput,
    UpdateRolloutStatusResult,
)
from services.audit import Actor
from services.rollouts import control, issue, outcomes, plan, queries, rollback, status, sweeps
from services.rollouts.counters import SweepBatch
from services.safety import SafetyGate
from workflows.policy import counted_total, decide, unsettled, window_open

log = structlog.get_logger(__name__)

# One batch of a keyset pass over a rollout's targets: (session, the vehicle id it starts
# after) -> what it moved and where the next batch starts.
BatchStep = Callable[[AsyncSession, str], Awaitable[SweepBatch]]


class RolloutActivities:
    """Activities with their dependencies injected (a session factory), registered on the
    worker as bound methods: `worker(activities=RolloutActivities(sessions).all())`."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS,
    ) -> None:
        self._sessions = sessions
        # How old a heartbeat the safety checks still trust (MOTORCADE_OFFLINE_AFTER_SECONDS).
        self._offline_after = offline_after_seconds

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.expand_targets,
            self.issue_stage,
            self.update_rollout_status,
            self.record_control_refusals,
            self.rollback_targets,
            self.evaluate_gates,
            self.expire_apply_timeouts,
            self.retry_failed_targets,
            self.recheck_blocked,
        ]

    @activity.defn(name="expand_targets")
    @domain_failures
    async def expand_targets(self, input: ExpandTargetsInput) -> ExpandTargetsResult:
        """Plan the rollout's stages and insert its targets (once; a re-run returns the plan).
        `TargetsChanged` (the fleet moved while planning) fails the attempt: retried."""
        async with session_scope(self._sessions) as session:
            expansion = await plan.plan_and_expand(session, rollout_id=input.rollout_id)
            policy = await queries.load_policy(session, rollout_id=input.rollout_id)
        log.info(
            "rollout.targets_expanded",
            rollout_id=input.rollout_id,
            targeted=expansion.targeted,
            per_stage=expansion.counts_per_stage,
            inserted=expansion.inserted,
        )
        return ExpandTargetsResult(
            rollout_id=input.rollout_id,
            release_version=expansion.release_version,
            targeted=expansion.targeted,
            stages=expansion.stages,
            inserted=expansion.inserted,
            policy=policy,
        )

    @activity.defn(name="issue_stage")
    @domain_failures
    async def issue_stage(self, input: IssueStageInput) -> IssueStageResult:
        """Issue the desired state to every planned vehicle of one stage, batch by batch.

        Each batch is its own transaction; after it commits the activity heartbeats its
        cursor (last vehicle id), where a retried attempt resumes. A batch re-run changes
        nothing (only `planned` targets are taken), so resuming before the cursor is safe.
        Between batches the failure threshold is checked over the rollout's counters: a
        breach stops issuing at once (`halted`); the rest of the stage stays `planned`.
        """
        progress = resumed_progress(IssueStageProgress)
        policy = await self._policy(input.rollout_id)
        safety = self._safety(policy)
        halted: GateDecision | None = None
        began = time.monotonic()
        while True:
            async with session_scope(self._sessions) as session:
                batch = await issue.issue_stage_batch(
                    session,
                    rollout_id=input.rollout_id,
                    stage_index=input.stage_index,
                    release_version=input.release_version,
                    after_vehicle_id=progress.last_vehicle_id,
                    batch_size=input.batch_size,
                    issued_at=input.issued_at,
                    safety=safety,
                )
                if batch.issued or batch.blocked:
                    await status.publish_rollout(session, rollout_id=input.rollout_id)
                counts = await queries.progress(session, rollout_id=input.rollout_id)
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
            halted = _breach(input, policy, counts, elapsed=time.monotonic() - began)
            if halted is not None:
                break
        log.info(
            "rollout.stage_issued",
            rollout_id=input.rollout_id,
            stage=input.stage,
            issued=progress.issued,
            batches=progress.batches,
            halted=halted.detail if halted else None,
        )
        return IssueStageResult(
            stage_index=input.stage_index,
            issued=progress.issued,
            batches=progress.batches,
            counts=counts,
            halted=halted,
        )

    @activity.defn(name="update_rollout_status")
    @domain_failures
    async def update_rollout_status(
        self, input: UpdateRolloutStatusInput
    ) -> UpdateRolloutStatusResult:
        """Write the rollout's status with its audit entry and change-feed event (once). An
        operator's action is audited here (source `temporal`) unless its API marker proves
        that the API audited the request (`control.api_request_verified`)."""
        async with session_scope(self._sessions) as session:
            if input.status in (RolloutStatus.ABORTED, RolloutStatus.ROLLED_BACK):
                await rollback.skip_planned_targets(session, rollout_id=input.rollout_id)
            audited_by_api = (
                input.control_action is not None
                and input.api_marker is not None
                and await control.api_request_verified(
                    session,
                    rollout_id=input.rollout_id,
                    action=input.control_action,
                    marker=input.api_marker,
                    accepted_at=input.accepted_at,
                )
            )
            changed = await status.set_rollout_status(
                session,
                rollout_id=input.rollout_id,
                status=input.status,
                action=input.action,
                stage=input.stage,
                stage_index=input.stage_index,
                status_reason=input.status_reason,
                waiting_for=input.waiting_for,
                actor=Actor(
                    subject=input.actor,
                    role=None,
                    source=AuditSource(input.source),
                    correlation_id=input.correlation_id,
                ),
                reason=input.reason,
                audit_entry=not audited_by_api,
            )
            counts = await queries.progress(session, rollout_id=input.rollout_id)
            finished = None
            if not changed:
                row = await queries.rollout_columns(
                    session, rollout_id=input.rollout_id, columns="status, status_reason"
                )
                if row.status != input.status and row.status in TERMINAL_ROLLOUT_STATUSES:
                    finished = row
        if finished is not None:
            return UpdateRolloutStatusResult(
                changed=False,
                counts=counts,
                finished_as=RolloutStatus(finished.status),
                finished_reason=finished.status_reason,
            )
        if changed:
            log.info(
                "rollout.status",
                rollout_id=input.rollout_id,
                status=input.status,
                stage=input.stage,
                action=input.action,
            )
        return UpdateRolloutStatusResult(changed=changed, counts=counts)

    @activity.defn(name="record_control_refusals")
    @domain_failures
    async def record_control_refusals(
        self, input: RecordControlRefusalsInput
    ) -> RecordControlRefusalsResult:
        """Audit the signals and Updates the workflow refused (`rollout.{action}_refused`,
        result `refused`), once each."""
        async with session_scope(self._sessions) as session:
            recorded = await control.record_refusals(
                session,
                rollout_id=input.rollout_id,
                refusals=input.refusals,
                dropped=input.dropped,
            )
        if recorded:
            log.info(
                "rollout.control_refused",
                rollout_id=input.rollout_id,
                recorded=recorded,
                dropped=input.dropped,
            )
        return RecordControlRefusalsResult(recorded=recorded)

    @activity.defn(name="rollback_targets")
    @domain_failures
    async def rollback_targets(self, input: RollbackTargetsInput) -> RollbackTargetsResult:
        """Return every vehicle the rollout touched (or one stage's) to its previous desired
        release, batch by batch (heartbeating), and mark the never-issued targets skipped."""
        async with session_scope(self._sessions) as session:
            skipped = await rollback.skip_planned_targets(session, rollout_id=input.rollout_id)
        safety = self._safety(await self._policy(input.rollout_id))

        async def step(session: AsyncSession, after: str) -> SweepBatch:
            return await rollback.rollback_batch(
                session,
                rollout_id=input.rollout_id,
                batch_size=input.batch_size,
                stage_index=input.stage_index,
                now=input.now,
                after_vehicle_id=after,
                safety=safety,
            )

        reverted = await self._keyset_pass(step)
        counts = await self._progress(input.rollout_id)
        log.info("rollout.rolled_back", rollout_id=input.rollout_id, reverted=reverted)
        return RollbackTargetsResult(reverted=reverted, skipped=skipped, counts=counts)

    @activity.defn(name="evaluate_gates")
    @domain_failures
    async def evaluate_gates(self, input: EvaluateGatesInput) -> EvaluateGatesResult:
        """Gate counts (the whole rollout and the stage, one GROUP BY each) and the pure
        decision of `policy.decide`. Read-only. `rollback`: the rollback's own outcomes
        (`rollback_gate_counts`), gated by the same failure threshold. `quick` (a look at new
        outcomes, many a minute while a large stage reports): the whole rollout from its
        counters' row (`policy.counted_total`, as issuing checks it between batches), the
        stage's GROUP BY only once nothing is applying any more (it may have settled; vehicles
        notified again by the blocked re-check are not waited for, as in the settle)."""
        rid = input.rollout_id
        stage_counted = True
        async with session_scope(self._sessions) as session:
            policy = await queries.load_policy(session, rollout_id=rid)
            counts, rechecked = await queries.gate_counters(session, rollout_id=rid)
            if input.rollback:
                total = await outcomes.rollback_gate_counts(
                    session, rollout_id=rid, stage_index=None
                )
                stage = await outcomes.rollback_gate_counts(
                    session, rollout_id=rid, stage_index=input.stage_index
                )
            else:
                if input.quick:  # the counters' row, and the stage once nothing applies
                    total = counted_total(counts, rechecked=rechecked)
                    stage_counted = unsettled(total) == 0
                else:
                    total = await outcomes.gate_counts(
                        session, rollout_id=rid, stage_index=None, max_attempts=policy.max_attempts
                    )
                stage = GateCounts()
                if stage_counted:
                    stage = await outcomes.gate_counts(
                        session,
                        rollout_id=rid,
                        stage_index=input.stage_index,
                        max_attempts=policy.max_attempts,
                    )
        decision = decide(
            policy=policy.gates,
            total=total,
            stage=stage,
            is_canary=input.is_canary,
            bake_done=input.bake_done,
            acknowledged_failed=input.acknowledged_failed,
            canary_forced=input.canary_forced,
            is_last=input.is_last,
        )
        kind = "rollback" if input.rollback else "canary" if input.is_canary else "wave"
        # Through the SDK's meter: served with its metrics on MOTORCADE_WORKER_METRICS_ADDRESS.
        activity.metric_meter().create_counter(
            "motorcade_gate_evaluations", "Gate evaluations by decision and stage kind."
        ).with_additional_attributes({"action": decision.action, "stage": kind}).add(1)
        if decision.action not in (GateAction.WAIT, GateAction.PROCEED):
            log.info(
                "rollout.gate",
                rollout_id=rid,
                stage_index=input.stage_index,
                action=decision.action,
                reason=decision.reason,
                detail=decision.detail,
            )
        return EvaluateGatesResult(
            total=total,
            stage=stage,
            decision=decision,
            counts=counts,
            settled=stage_counted and unsettled(stage) == 0,
            unsettled=unsettled(stage),
            stage_counted=stage_counted,
        )

    @activity.defn(name="expire_apply_timeouts")
    @domain_failures
    async def expire_apply_timeouts(self, input: TargetSweepInput) -> TargetSweepResult:
        """Targets notified/updating for longer than `timeouts.applySeconds` -> failed,
        APPLY_TIMEOUT."""
        policy = await self._policy(input.rollout_id)

        async def step(session: AsyncSession, after: str) -> SweepBatch:
            return await sweeps.expire_apply_timeouts(
                session,
                rollout_id=input.rollout_id,
                now=input.now,
                apply_seconds=policy.apply_seconds,
                after_vehicle_id=after,
            )

        return await self._sweep("apply_timeouts_expired", input, step)

    @activity.defn(name="retry_failed_targets")
    @domain_failures
    async def retry_failed_targets(self, input: TargetSweepInput) -> TargetSweepResult:
        """Re-issue a new desired state to targets failed for a retryable reason, attempts left
        and backoff over (idempotent: keyed by rollout and attempt)."""
        async with session_scope(self._sessions) as session:
            policy = await queries.load_policy(session, rollout_id=input.rollout_id)
            rollout = await queries.load_rollout(session, rollout_id=input.rollout_id)

        async def step(session: AsyncSession, after: str) -> SweepBatch:
            return await sweeps.retry_failed_targets(
                session,
                rollout_id=input.rollout_id,
                release_version=rollout.release_version,
                now=input.now,
                max_attempts=policy.max_attempts,
                backoff_seconds=policy.backoff_seconds,
                after_vehicle_id=after,
                safety=self._safety(policy),
            )

        return await self._sweep("targets_retried", input, step)

    @activity.defn(name="recheck_blocked")
    @domain_failures
    async def recheck_blocked(self, input: TargetSweepInput) -> TargetSweepResult:
        """Blocked targets whose latest heartbeat passes the safety checks -> notified (the
        vehicles the server held back get their desired state); the others' reasons kept
        current."""
        safety = self._safety(await self._policy(input.rollout_id))

        async def step(session: AsyncSession, after: str) -> SweepBatch:
            return await sweeps.recheck_blocked(
                session,
                rollout_id=input.rollout_id,
                now=input.now,
                safety=safety,
                after_vehicle_id=after,
            )

        return await self._sweep("blocked_rechecked", input, step)

    async def _sweep(
        self, name: str, input: TargetSweepInput, step: BatchStep
    ) -> TargetSweepResult:
        """A sweep as one keyset pass over the rollout's targets, then the rollout published
        once if anything moved."""
        changed = await self._keyset_pass(step)
        async with session_scope(self._sessions) as session:
            if changed:
                await status.publish_rollout(session, rollout_id=input.rollout_id)
            counts = await queries.progress(session, rollout_id=input.rollout_id)
        if changed:
            log.info(f"rollout.{name}", rollout_id=input.rollout_id, changed=changed)
        return TargetSweepResult(changed=changed, counts=counts)

    async def _keyset_pass(self, step: BatchStep) -> int:
        """Run `step` batch by batch (one transaction each, heartbeating how many targets
        moved) until the pass reaches the end; returns how many moved."""
        changed, after = 0, ""
        while True:
            async with session_scope(self._sessions) as session:
                batch = await step(session, after)
            changed += batch.changed
            after = batch.last_vehicle_id
            activity.heartbeat(changed)
            if batch.done:
                return changed

    def _safety(self, policy: RolloutPolicy) -> SafetyGate:
        return SafetyGate.of_policy(policy, offline_after_seconds=self._offline_after)

    async def _policy(self, rollout_id: int) -> RolloutPolicy:
        async with session_scope(self._sessions) as session:
            return await queries.load_policy(session, rollout_id=rollout_id)

    async def _progress(self, rollout_id: int) -> RolloutCounts:
        async with session_scope(self._sessions) as session:
            return await queries.progress(session, rollout_id=rollout_id)


def _breach(
    input: IssueStageInput, policy: RolloutPolicy, counts: RolloutCounts, *, elapsed: float
) -> GateDecision | None:
    """What stops issuing between two batches, or None to go on: the failure threshold over
    the rollout's counters as the batch left them (`counts`): pause or rollback; the
    maintenance window closed since the issue began (`issued_at`, the workflow's time, plus
    the `elapsed` seconds): a wait for it, with OUTSIDE_MAINTENANCE_WINDOW."""
    decision = decide(
        policy=policy.gates,
        total=counted_total(counts),
        stage=GateCounts(),
        is_canary=False,
        bake_done=False,
        acknowledged_failed=input.acknowledged_failed,
    )
    if decision.action in (GateAction.PAUSE, GateAction.ROLLBACK):
        return decision
    now = (input.issued_at or datetime.now(UTC)) + timedelta(seconds=elapsed)
    if not window_open(now, policy.window):
        return GateDecision(
            action=GateAction.WAIT,
            reason=StatusReason.OUTSIDE_MAINTENANCE_WINDOW,
            detail="the maintenance window closed while the stage was being issued",
        )
    return None
