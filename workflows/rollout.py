"""`RolloutWorkflow` (v1): one workflow per rollout, id `rollout-{id}`.

Sequencing only: mark running, expand the targets (in PostgreSQL), then per stage issue the
desired state and bake, honoring `pause` / `resume` / `abort` / `rollback` signals; completed.
Vehicle lists never enter the history: activities return counts and the stage plan.

Not yet in v1 (a later issue): gates (canary health, failure threshold), safety checks and
maintenance windows, per-vehicle timeouts and retries, Updates with validators,
continue-as-new (the state model is ready for it).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.temporal import ROLLOUT_WORKFLOW_TYPE, SA_ROLLOUT_STAGE, SA_ROLLOUT_STATUS
    from models.workflows import (
        ExpandTargetsInput,
        ExpandTargetsResult,
        IssueStageInput,
        IssueStageResult,
        OperatorAction,
        RollbackTargetsInput,
        RollbackTargetsResult,
        RolloutInput,
        RolloutResult,
        RolloutSignal,
        RolloutState,
        StagePlan,
        UpdateRolloutStatusInput,
        UpdateRolloutStatusResult,
    )

SHORT_ACTIVITY = timedelta(seconds=60)
LONG_ACTIVITY = timedelta(hours=1)
LONG_HEARTBEAT = timedelta(minutes=2)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=30,
)
ISSUE_BATCH_SIZE = 1000
OPERATOR = "OPERATOR"


@workflow.defn(name=ROLLOUT_WORKFLOW_TYPE)
class RolloutWorkflow:
    @workflow.init
    def __init__(self, input: RolloutInput) -> None:
        self._state = RolloutState(
            rollout_id=input.rollout_id,
            release_version=input.release_version,
            correlation_id=input.correlation_id,
        )
        # What the main flow waits for while running (restored on resume).
        self._flow_waiting: str | None = None
        self._stop_action: OperatorAction | None = None

    # --- Signals and query ------------------------------------------------------------------

    def _accept(self, name: str, body: RolloutSignal | None) -> OperatorAction | None:
        s = self._state
        body = body or RolloutSignal()
        action = OperatorAction(
            action=name,
            reason=body.reason,
            actor=body.actor or "temporal",
            source=body.source or "temporal",
            correlation_id=body.correlation_id or s.correlation_id,
        )
        finished = s.status in ("completed", "rolled_back", "aborted", "failed")
        if finished or s.stop_requested is not None:
            workflow.logger.warning("signal %s ignored: rollout is %s", name, s.status)
            return None
        return action

    @workflow.signal(name="pause")
    def pause(self, body: RolloutSignal | None = None) -> None:
        action = self._accept("pause", body)
        if action is None or self._state.paused:
            return
        self._state.paused = True
        self._state.pending_actions.append(action)

    @workflow.signal(name="resume")
    def resume(self, body: RolloutSignal | None = None) -> None:
        action = self._accept("resume", body)
        if action is None or not self._state.paused:
            return
        self._state.paused = False
        self._state.pending_actions.append(action)

    @workflow.signal(name="abort")
    def abort(self, body: RolloutSignal | None = None) -> None:
        action = self._accept("abort", body)
        if action is None:
            return
        self._state.stop_requested = "abort"
        self._stop_action = action

    @workflow.signal(name="rollback")
    def rollback(self, body: RolloutSignal | None = None) -> None:
        action = self._accept("rollback", body)
        if action is None:
            return
        self._state.stop_requested = "rollback"
        self._stop_action = action

    @workflow.query(name="progress")
    def progress(self) -> RolloutState:
        return self._state

    # --- Run --------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: RolloutInput) -> RolloutResult:
        s = self._state
        try:
            await self._set_status("running", action="rollout.started", waiting_for="targets")
            expansion = await workflow.execute_activity(
                "expand_targets",
                ExpandTargetsInput(rollout_id=s.rollout_id),
                result_type=ExpandTargetsResult,
                start_to_close_timeout=LONG_ACTIVITY,
                retry_policy=DB_RETRY,
            )
            s.stages = expansion.stages
            s.stage_count = len(expansion.stages)
            s.expanded = True
            s.counts.targeted = expansion.targeted

            for stage in s.stages[s.next_stage :]:
                if await self._checkpoint():
                    break
                await self._run_stage(stage)

            if s.stop_requested is None:
                # Paused during the last bake: hold (an operator may still roll back).
                await self._checkpoint()
            if s.stop_requested == "abort":
                await self._abort()
            elif s.stop_requested == "rollback":
                await self._rollback()
            else:
                await self._set_status("completed", action="rollout.completed", waiting_for=None)
        except ActivityError as err:
            await self._fail(err)
            raise ApplicationError(
                f"rollout {s.rollout_id} failed: {err.cause or err}", type="RolloutFailed"
            ) from err
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RolloutResult(
            rollout_id=s.rollout_id,
            status=s.status,
            status_reason=s.status_reason,
            stages_issued=s.next_stage,
            counts=s.counts,
        )

    async def _run_stage(self, stage: StagePlan) -> None:
        s = self._state
        s.stage, s.stage_index = stage.name, stage.index
        await self._set_status(
            "running",
            action="rollout.stage_started",
            waiting_for=f"issuing {stage.name} ({stage.size} vehicles)",
        )
        if stage.size > 0:
            issued = await workflow.execute_activity(
                "issue_stage",
                IssueStageInput(
                    rollout_id=s.rollout_id,
                    release_version=s.release_version,
                    stage_index=stage.index,
                    stage=stage.name,
                    batch_size=ISSUE_BATCH_SIZE,
                ),
                result_type=IssueStageResult,
                start_to_close_timeout=LONG_ACTIVITY,
                heartbeat_timeout=LONG_HEARTBEAT,
                retry_policy=DB_RETRY,
            )
            s.counts = issued.counts
        s.next_stage = stage.index + 1
        if stage.size > 0 and stage.bake_seconds > 0:
            await self._bake(stage)

    async def _bake(self, stage: StagePlan) -> None:
        """Wait `bake_seconds` (a durable timer), persisting pause/resume as they arrive and
        returning early on abort or rollback. A pause does not stop the bake clock; the next
        stage waits for resume."""
        s = self._state
        deadline = workflow.now() + timedelta(seconds=stage.bake_seconds)
        await self._set_status(
            "running",
            action="rollout.baking",
            waiting_for=f"bake of {stage.name} until {deadline.isoformat()}",
        )
        while True:
            await self._drain_actions()
            if s.stop_requested is not None:
                return
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                return
            try:
                await workflow.wait_condition(
                    lambda: bool(s.pending_actions) or s.stop_requested is not None,
                    timeout=timedelta(seconds=remaining),
                )
            except TimeoutError:
                return

    async def _checkpoint(self) -> bool:
        """Between stages: persist operator actions, wait while paused. True to stop."""
        s = self._state
        while True:
            await self._drain_actions()
            if s.stop_requested is not None:
                return True
            if not s.paused:
                return False
            await workflow.wait_condition(
                lambda: bool(s.pending_actions) or s.stop_requested is not None or not s.paused
            )

    async def _drain_actions(self) -> None:
        s = self._state
        while s.pending_actions:
            action = s.pending_actions.pop(0)
            if action.action == "pause":
                await self._set_status(
                    "paused",
                    action="rollout.paused",
                    status_reason=OPERATOR,
                    waiting_for="resume",
                    operator=action,
                    keep_flow_waiting=True,
                )
            elif action.action == "resume":
                await self._set_status(
                    "running",
                    action="rollout.resumed",
                    waiting_for=self._flow_waiting,
                    operator=action,
                )

    async def _abort(self) -> None:
        await self._set_status(
            "aborted",
            action="rollout.aborted",
            status_reason=OPERATOR,
            waiting_for=None,
            operator=self._stop_action,
        )

    async def _rollback(self) -> None:
        s = self._state
        await self._set_status(
            "rolling_back",
            action="rollout.rollback_started",
            status_reason=OPERATOR,
            waiting_for="vehicles to be returned to their previous desired state",
            operator=self._stop_action,
        )
        result = await workflow.execute_activity(
            "rollback_targets",
            RollbackTargetsInput(rollout_id=s.rollout_id, batch_size=ISSUE_BATCH_SIZE),
            result_type=RollbackTargetsResult,
            start_to_close_timeout=LONG_ACTIVITY,
            heartbeat_timeout=LONG_HEARTBEAT,
            retry_policy=DB_RETRY,
        )
        s.counts = result.counts
        await self._set_status(
            "rolled_back", action="rollout.rolled_back", status_reason=OPERATOR, waiting_for=None
        )

    async def _fail(self, err: ActivityError) -> None:
        try:
            await self._set_status(
                "failed",
                action="rollout.failed",
                status_reason="ACTIVITY_FAILED",
                waiting_for=None,
                reason=str(err.cause or err)[:500],
            )
        except ActivityError:
            workflow.logger.exception("could not record the failure of the rollout")

    async def _set_status(
        self,
        status: str,
        *,
        action: str,
        waiting_for: str | None,
        status_reason: str | None = None,
        operator: OperatorAction | None = None,
        reason: str | None = None,
        keep_flow_waiting: bool = False,
    ) -> None:
        """Persist the status (activity: row, audit entry, change-feed event), then the search
        attributes and the current details."""
        s = self._state
        if not keep_flow_waiting:
            self._flow_waiting = waiting_for
        result = await workflow.execute_activity(
            "update_rollout_status",
            UpdateRolloutStatusInput(
                rollout_id=s.rollout_id,
                status=status,
                stage=s.stage,
                stage_index=s.stage_index,
                status_reason=status_reason,
                waiting_for=waiting_for,
                action=action,
                actor=(operator.actor or "temporal") if operator else "workflow",
                source=operator.source if operator else "system",
                reason=operator.reason if operator else reason,
                correlation_id=(operator.correlation_id if operator else None) or s.correlation_id,
                audit=not (operator is not None and operator.source == "api"),
            ),
            result_type=UpdateRolloutStatusResult,
            start_to_close_timeout=SHORT_ACTIVITY,
            retry_policy=DB_RETRY,
        )
        s.counts = result.counts
        s.status, s.status_reason, s.waiting_for = status, status_reason, waiting_for
        self._upsert_search_attributes()
        workflow.set_current_details(self._details())

    def _upsert_search_attributes(self) -> None:
        s = self._state
        current = workflow.info().typed_search_attributes
        updates = []
        if current.get(SA_ROLLOUT_STATUS) != s.status:
            updates.append(SA_ROLLOUT_STATUS.value_set(s.status))
        if current.get(SA_ROLLOUT_STAGE) != (s.stage or ""):
            updates.append(SA_ROLLOUT_STAGE.value_set(s.stage or ""))
        if updates:
            workflow.upsert_search_attributes(updates)

    def _details(self) -> str:
        s = self._state
        stage = f"{s.stage} ({s.stage_index + 1}/{s.stage_count})" if s.stage else "-"
        waiting = f"waiting for {s.waiting_for}" if s.waiting_for else "not waiting"
        c = s.counts
        return (
            f"**{s.status}**, stage {stage}: {waiting}. "
            f"Targeted {c.targeted}, notified {c.notified}, succeeded {c.succeeded}, "
            f"failed {c.failed}, pending {c.pending}."
        )
