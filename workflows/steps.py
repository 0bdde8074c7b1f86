"""The rollout workflow's steps: every activity it calls (with its timeouts, heartbeats and
retries), how it persists a status (the activity, then the search attributes and the Web UI's
current details), operator actions waiting to be persisted, and its durable waits.

`RolloutWorkflow` (workflows/rollout.py) inherits them and sequences them. What comes next
is never decided here: the pure rules (`workflows.policy`, `workflows.control`) decide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.rollouts import RolloutActivities
    from core.temporal import SA_ROLLOUT_STAGE, SA_ROLLOUT_STATUS
    from models.defaults import ISSUE_BATCH_SIZE
    from models.enums import AuditSource, RolloutStatus, StatusReason
    from models.workflows import (
        EvaluateGatesInput,
        EvaluateGatesResult,
        ExpandTargetsInput,
        ExpandTargetsResult,
        IssueStageInput,
        IssueStageResult,
        OperatorAction,
        RecordControlRefusalsInput,
        RollbackTargetsInput,
        RollbackTargetsResult,
        RolloutInput,
        RolloutState,
        StagePlan,
        Sweep,
        TargetSweepInput,
        TargetSweepResult,
        UpdateRolloutStatusInput,
    )
    from workflows import control
    from workflows.policy import CANARY, sweeps_due, window_open

# Runs that recorded this marker are judged by outcomes (stages settle before they bake, new
# outcomes wake the gates, refusals are audited, nothing is retried outside the window);
# runs started before it (no marker in their history) keep the rules they ran with.
SETTLE_PATCH = "settle-before-bake"

SHORT_ACTIVITY = timedelta(seconds=60)
LONG_ACTIVITY = timedelta(hours=1)
# A batch activity heartbeats after every batch (5,000 targets issued in about 0.2 s at a
# million vehicles: docs/rollouts.md); a worker killed mid-activity is noticed after this
# long, and its activity retried on another worker (docs/operations.md, "A worker dies").
LONG_HEARTBEAT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=30,
)
SweepActivity = Callable[[RolloutActivities, TargetSweepInput], Awaitable[TargetSweepResult]]
SWEEP_ACTIVITIES: dict[Sweep, SweepActivity] = {
    Sweep.EXPIRE_APPLY_TIMEOUTS: RolloutActivities.expire_apply_timeouts,
    Sweep.RETRY_FAILED_TARGETS: RolloutActivities.retry_failed_targets,
    Sweep.RECHECK_BLOCKED: RolloutActivities.recheck_blocked,
}


class RolloutAlreadyFinished(Exception):
    """The rollout's row is terminal already (aborted before its workflow started, for one):
    the status write was refused, and the run ends at once (`RolloutWorkflow.run` catches it;
    never a failed workflow task)."""


class RolloutSteps:
    """The steps `RolloutWorkflow` sequences, over its state (set by its `__init__`)."""

    _input: RolloutInput
    _state: RolloutState
    # What the main flow waits for while running (restored on resume).
    _flow_waiting: str | None
    # New outcomes were signalled since the gates last looked.
    _outcomes_changed: bool

    async def _expand_targets(self) -> ExpandTargetsResult:
        return await workflow.execute_activity_method(
            RolloutActivities.expand_targets,
            ExpandTargetsInput(rollout_id=self._state.rollout_id),
            start_to_close_timeout=LONG_ACTIVITY,
            retry_policy=DB_RETRY,
        )

    async def _issue_stage(self, stage: StagePlan, issued_at: datetime) -> IssueStageResult:
        s = self._state
        return await workflow.execute_activity_method(
            RolloutActivities.issue_stage,
            IssueStageInput(
                rollout_id=s.rollout_id,
                release_version=s.release_version,
                stage_index=stage.index,
                stage=stage.name,
                batch_size=self._input.issue_batch_size or ISSUE_BATCH_SIZE,
                issued_at=issued_at,
                acknowledged_failed=s.acknowledged_failed,
            ),
            start_to_close_timeout=LONG_ACTIVITY,
            heartbeat_timeout=LONG_HEARTBEAT,
            retry_policy=DB_RETRY,
        )

    async def _set_status(
        self,
        status: RolloutStatus,
        *,
        action: str,
        waiting_for: str | None,
        status_reason: StatusReason | None = None,
        operator: OperatorAction | None = None,
        reason: str | None = None,
        keep_flow_waiting: bool = False,
    ) -> None:
        """Persist the status (activity: row, audit entry, change-feed event), then the search
        attributes and the current details. An operator's action is audited after the
        refusals that came before it."""
        s = self._state
        if operator is not None:
            await self._drain_refusals(before=operator.seq)
        if not keep_flow_waiting:
            self._flow_waiting = waiting_for
        result = await workflow.execute_activity_method(
            RolloutActivities.update_rollout_status,
            UpdateRolloutStatusInput(
                rollout_id=s.rollout_id,
                status=status,
                stage=s.stage,
                stage_index=s.stage_index,
                status_reason=status_reason,
                waiting_for=waiting_for,
                action=action,
                actor=(operator.actor or "temporal") if operator else "workflow",
                source=operator.source if operator else AuditSource.SYSTEM,
                reason=operator.reason if operator else reason,
                correlation_id=(operator.correlation_id if operator else None) or s.correlation_id,
                # An operator's action is audited unless the activity finds that the API
                # audited this very request (its marker, checked against PostgreSQL).
                control_action=operator.action if operator else None,
                api_marker=operator.api_marker if operator else None,
                accepted_at=operator.accepted_at if operator else None,
            ),
            start_to_close_timeout=SHORT_ACTIVITY,
            retry_policy=DB_RETRY,
        )
        s.counts = result.counts
        if result.finished_as is not None:  # no transition out of a terminal status
            s.status, s.waiting_for = result.finished_as, None
            why = result.finished_reason
            known = why is not None and why in {r.value for r in StatusReason}
            s.status_reason = StatusReason(why) if why is not None and known else None
            self._upsert_search_attributes()
            workflow.set_current_details(self._details())
            raise RolloutAlreadyFinished(s.status)
        s.status, s.status_reason, s.waiting_for = status, status_reason, waiting_for
        self._upsert_search_attributes()
        workflow.set_current_details(self._details())

    def _upsert_search_attributes(self) -> None:
        s = self._state
        current = workflow.info().typed_search_attributes
        updates = []
        if current.get(SA_ROLLOUT_STATUS) != s.status:
            updates.append(SA_ROLLOUT_STATUS.value_set(s.status.value))
        if current.get(SA_ROLLOUT_STAGE) != (s.stage or ""):
            updates.append(SA_ROLLOUT_STAGE.value_set(s.stage or ""))
        if updates:
            workflow.upsert_search_attributes(updates)

    def _details(self, waiting_for: str | None = None) -> str:
        """The Web UI's current details: status, stage, what it waits for (`waiting_for`, when
        fresher than the row's) and why."""
        s = self._state
        stage = f"{s.stage} ({s.stage_index + 1}/{s.stage_count})" if s.stage else "-"
        waiting_for = waiting_for or s.waiting_for
        waiting = f"waiting for {waiting_for}" if waiting_for else "not waiting"
        reason = f" ({s.status_reason})" if s.status_reason else ""
        paused = ""
        if s.status == RolloutStatus.PAUSED:
            paused = f" Paused by {s.paused_by or 'unknown'}: {s.pause_note or 'no reason given'}."
        c = s.counts
        return (
            f"**{s.status}**{reason}, stage {stage}: {waiting}.{paused} "
            f"Targeted {c.targeted}, notified {c.notified}, updating {c.updating}, "
            f"succeeded {c.succeeded}, failed {c.failed}, blocked {c.blocked}, "
            f"pending {c.pending}."
        )

    async def _drain_actions(self) -> None:
        """Persist accepted pause/resume actions and audit refused ones, in the order they
        came (refusals that came after a pending stop wait for the stop's own entry)."""
        s = self._state
        while s.pending_actions:
            action = s.pending_actions.pop(0)
            if action.action == "pause":
                change = control.record_pause(s, action)
                await self._set_status(
                    change.status,
                    action="rollout.paused",
                    status_reason=change.status_reason,
                    waiting_for="resume",
                    operator=action,
                    keep_flow_waiting=True,
                )
            elif action.action == "resume":
                change = control.acknowledge_resume(s, action)
                await self._set_status(
                    change.status,
                    action="rollout.resumed",
                    status_reason=change.status_reason,
                    waiting_for=self._flow_waiting,
                    operator=action,
                )
        await self._drain_refusals(before=control.refusals_before_stop(s))

    async def _drain_refusals(self, before: int | None = None) -> None:
        """Audit the refused signals and Updates waiting in the state that came before the
        action numbered `before` (None: all), in one activity. Without such refusals it
        schedules nothing, so histories without refusals replay unchanged."""
        s = self._state
        while refusals := control.take_refusals(s, before):
            await workflow.execute_activity_method(
                RolloutActivities.record_control_refusals,
                RecordControlRefusalsInput(
                    rollout_id=s.rollout_id, refusals=refusals, dropped=s.refusals_dropped
                ),
                start_to_close_timeout=SHORT_ACTIVITY,
                retry_policy=DB_RETRY,
            )

    async def _abort(self) -> None:
        await self._set_status(
            RolloutStatus.ABORTED,
            action="rollout.aborted",
            status_reason=StatusReason.OPERATOR,
            waiting_for=None,
            operator=self._state.stop_action,
        )

    async def _fail(self, err: ActivityError) -> None:
        try:
            await self._set_status(
                RolloutStatus.FAILED,
                action="rollout.failed",
                status_reason=StatusReason.ACTIVITY_FAILED,
                waiting_for=None,
                reason=str(err.cause or err)[:500],
            )
        except (ActivityError, RolloutAlreadyFinished):
            workflow.logger.exception("could not record the failure of the rollout")

    def _judged_by_outcomes(self) -> bool:
        """Whether this run has the rules of SETTLE_PATCH (the SDK keeps the answer for the
        run: a run from before answers False throughout, so it replays as it ran)."""
        return workflow.patched(SETTLE_PATCH)

    async def _gate_tick(
        self,
        stage: StagePlan,
        bake_done: bool,
        *,
        rollback: bool = False,
        sweeps: bool = True,
        quick: bool = False,
    ) -> EvaluateGatesResult:
        """The sweeps due (`policy.sweeps_due`, judged by the last counts; none when `sweeps`
        is False: a look at new outcomes), then the gates. A rollback's tick (`rollback`)
        sweeps only returned vehicles that never report (they time out), and its gate is the
        failure threshold over the rollback's own outcomes, with the rollback's acknowledged
        failures. Retries and re-checks wait while the maintenance window is closed. `quick`:
        a look at new outcomes before the bake is over, from the rollout's counters (the
        stage is counted only once nothing is applying any more)."""
        s = self._state
        now = workflow.now()
        due = sweeps_due(
            s.rollback_total if rollback else s.last_total,
            now=now,
            first_issued_at=s.first_issued_at,
            apply_seconds=s.policy.apply_seconds,
            rollback=rollback,
            window_open=window_open(now, s.policy.window) or not self._judged_by_outcomes(),
        )
        if sweeps:
            await self._sweeps(due, TargetSweepInput(rollout_id=s.rollout_id, now=now))
        result = await self._evaluate(
            EvaluateGatesInput(
                rollout_id=s.rollout_id,
                stage_index=stage.index,
                is_canary=not rollback and stage.name == CANARY,
                bake_done=bake_done,
                acknowledged_failed=(
                    s.rollback_acknowledged_failed if rollback else s.acknowledged_failed
                ),
                canary_forced=not rollback and s.canary_forced_stage == stage.index,
                rollback=rollback,
                is_last=not rollback and stage.index == len(s.stages) - 1,
                quick=quick and not rollback,
            )
        )
        if rollback:
            s.rollback_total = result.total
        elif quick:  # the counters know no retries to come: keep the last tick's
            s.last_total = result.total.model_copy(update={"retryable": s.last_total.retryable})
        else:
            s.last_total = result.total
        return result

    async def _evaluate(self, gate: EvaluateGatesInput) -> EvaluateGatesResult:
        result = await workflow.execute_activity_method(
            RolloutActivities.evaluate_gates,
            gate,
            start_to_close_timeout=SHORT_ACTIVITY,
            retry_policy=DB_RETRY,
        )
        self._state.counts = result.counts
        return result

    async def _sweeps(self, due: list[Sweep], sweep: TargetSweepInput) -> None:
        for name in due:
            await self._sweep(SWEEP_ACTIVITIES[name], sweep)

    async def _sweep(self, activity: SweepActivity, sweep: TargetSweepInput) -> None:
        result = await workflow.execute_activity_method(
            activity,
            sweep,
            start_to_close_timeout=LONG_ACTIVITY,
            heartbeat_timeout=LONG_HEARTBEAT,
            retry_policy=DB_RETRY,
        )
        self._state.counts = result.counts

    async def _rollback_targets(self, stage_index: int | None) -> RollbackTargetsResult:
        return await workflow.execute_activity_method(
            RolloutActivities.rollback_targets,
            RollbackTargetsInput(
                rollout_id=self._state.rollout_id,
                batch_size=ISSUE_BATCH_SIZE,
                stage_index=stage_index,
                now=workflow.now(),
            ),
            start_to_close_timeout=LONG_ACTIVITY,
            heartbeat_timeout=LONG_HEARTBEAT,
            retry_policy=DB_RETRY,
        )

    async def _sleep_until(self, deadline: datetime | None, *, outcomes: bool = False) -> None:
        """A durable timer that an operator action cuts short (None: until an action), and
        new outcomes too when `outcomes` (the `outcomes` signal)."""
        s = self._state

        def woken() -> bool:
            return (
                bool(s.pending_actions)
                or control.stop_pending(s)
                or (outcomes and self._outcomes_changed)
                or bool(s.pending_refusals)  # a refused signal or Update to audit
            )

        if deadline is None:
            await workflow.wait_condition(woken)
            return
        remaining = (deadline - workflow.now()).total_seconds()
        if remaining <= 0:
            return
        try:
            await workflow.wait_condition(woken, timeout=timedelta(seconds=remaining))
        except TimeoutError:
            pass

    async def _wait_for_operator(self) -> None:
        """Until an operator acts. Outcomes keep coming while a rollout is held: each signal
        lengthens the history, so they wake it only to continue-as-new when Temporal
        suggests it (the gates look again once it is resumed)."""
        judged = self._judged_by_outcomes()
        await self._sleep_until(None, outcomes=judged)
        if judged and self._outcomes_changed:
            self._outcomes_changed = False
            self._maybe_continue_as_new()

    def _maybe_continue_as_new(self) -> None:
        info = workflow.info()
        limit = self._input.continue_as_new_after_events
        if not (
            info.is_continue_as_new_suggested()
            or (limit is not None and info.get_current_history_length() >= limit)
        ):
            return
        if not workflow.all_handlers_finished():
            return  # handlers never await: they will be done by the next check
        workflow.continue_as_new(
            self._input.model_copy(update={"state": self._state}),
            search_attributes=info.typed_search_attributes,
        )


def iso(moment: datetime | None) -> str:
    return moment.isoformat().replace("+00:00", "Z") if moment else "-"
