"""`RolloutWorkflow`: one workflow per rollout, id `rollout-{id}`.

Sequencing only: every rule is a pure function (`workflows.policy` for stages and gates,
`workflows.control` for operator transitions), every read and write an activity, called by the
steps this class inherits (`workflows.steps`: activity calls, status writes, durable waits).
Vehicle lists never enter the history: activities return counts and the stage plan.

Per stage: wait for the maintenance window (a durable timer until it opens; statusReason
OUTSIDE_MAINTENANCE_WINDOW meanwhile), issue the desired state (batched, idempotent), then bake
(a durable deadline) while a gate tick runs every `min(60, bake)` seconds: expire apply
timeouts, retry retryable failures, recheck blocked vehicles, evaluate the gates. The failure
threshold is checked at every tick (pause, or rollback as its `action` says); after the canary's
bake the canary must be healthy, else the rollout pauses with CANARY_UNHEALTHY and never
progresses on its own.

Operators: the `control` Update (the API; a validator refuses an invalid transition at once)
and the `pause` / `resume` / `rollback` / `abort` signals (the `temporal` CLI, SPEC's JSON body)
go through one path: `control.refusal` decides whether the action is valid now,
`control.accept` records it in the state; the main flow persists it (status row, audit entry
for `source != "api"`, search attributes, current details). Handlers never await, so they need
no lock.

Resume after a gate pause (`control.acknowledge_resume`): FAILURE_THRESHOLD - the failures seen
so far are acknowledged (they no longer count; new failures beyond the threshold pause again).
CANARY_UNHEALTHY - the canary is evaluated again (more vehicles may have reported since); still
unhealthy, the rollout pauses again, unless the operator resumes with `force: true` (audited
with its reason).

Rollback: staged, last issued stage first, each touched vehicle back to its previous desired
state (declarative: new desired states); each returned stage bakes min(its bake, 300 s) under
the failure threshold over the rollback's own outcomes, and a breach pauses the rollback
(FAILURE_THRESHOLD) before the next stage (resume continues it, abort stops it).
Abort: stops; never-issued targets are skipped.

History stays bounded: continue-as-new when Temporal suggests it, carrying `RolloutState`;
the run resumes from the stage and phase it was in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.temporal import CONTROL_UPDATE, ROLLOUT_WORKFLOW_TYPE
    from models.enums import AuditSource, RolloutStatus, StatusReason
    from models.workflows import (
        ControlAction,
        ControlRequest,
        ControlResult,
        GateAction,
        GateDecision,
        OperatorAction,
        RolloutInput,
        RolloutResult,
        RolloutSignal,
        RolloutState,
        StagePlan,
    )
    from workflows import control
    from workflows.policy import next_window_start

from workflows.steps import RolloutSteps, iso

MAX_GATE_INTERVAL = 60
# A rollback stage bakes min(its bake, this) before the next stage is returned.
ROLLBACK_MAX_BAKE = 300


@dataclass(frozen=True)
class BakeKind:
    """What differs between a stage's bake and a rollback stage's bake (`_bake` runs both)."""

    label: str  # waiting_for while baking: "{label} of {stage} until {deadline}"
    status: RolloutStatus  # the status while baking
    baking_action: str  # audit action when the bake is announced
    announce_at_start: bool  # announced before the first gate tick, else once it waits
    gate_failed_action: str  # audit action when a failing gate pauses it
    waiting_for_operator: str  # waiting_for while a failing gate holds it
    # The rollback's bake: its gate counts the rollback's own outcomes (and the failures
    # acknowledged on resuming it), its status carries the stop's reason, and a failure
    # threshold pauses it whatever the gate's action (a stage's bake rolls back if it says so).
    rollback: bool


STAGE_BAKE = BakeKind(
    label="bake",
    status=RolloutStatus.RUNNING,
    baking_action="rollout.baking",
    announce_at_start=True,
    gate_failed_action="rollout.gate_failed",
    waiting_for_operator="an operator (resume, rollback or abort)",
    rollback=False,
)
ROLLBACK_BAKE = BakeKind(
    label="rollback bake",
    status=RolloutStatus.ROLLING_BACK,
    baking_action="rollout.rollback_baking",
    announce_at_start=False,
    gate_failed_action="rollout.rollback_gate_failed",
    waiting_for_operator="an operator (resume or abort)",
    rollback=True,
)


@workflow.defn(name=ROLLOUT_WORKFLOW_TYPE)
class RolloutWorkflow(RolloutSteps):
    @workflow.init
    def __init__(self, input: RolloutInput) -> None:
        if input.state is not None:  # continue-as-new: resume where the last run stopped
            self._state = input.state.model_copy(deep=True)
            self._state.runs += 1
        else:
            self._state = RolloutState(
                rollout_id=input.rollout_id,
                release_version=input.release_version,
                correlation_id=input.correlation_id,
            )
        self._input = input
        # What the main flow waits for while running (restored on resume).
        self._flow_waiting: str | None = self._state.waiting_for

    # --- Control: one path for the Update and the signals -----------------------------------

    def _signal(self, name: ControlAction, body: RolloutSignal | None) -> None:
        body = body or RolloutSignal()
        refusal = control.refusal(self._state, name)
        if refusal is not None:
            workflow.logger.warning("signal ignored: %s", refusal)
            return
        control.accept(
            self._state,
            OperatorAction(
                action=name,
                reason=body.reason,
                actor=body.actor or "temporal",
                source=AuditSource.TEMPORAL,  # whatever the body claims (SPEC.md)
                correlation_id=body.correlation_id or self._state.correlation_id,
                force=body.force,
            ),
        )

    @workflow.signal(name="pause")
    def pause(self, body: RolloutSignal | None = None) -> None:
        self._signal("pause", body)

    @workflow.signal(name="resume")
    def resume(self, body: RolloutSignal | None = None) -> None:
        self._signal("resume", body)

    @workflow.signal(name="abort")
    def abort(self, body: RolloutSignal | None = None) -> None:
        self._signal("abort", body)

    @workflow.signal(name="rollback")
    def rollback(self, body: RolloutSignal | None = None) -> None:
        self._signal("rollback", body)

    @workflow.update(name=CONTROL_UPDATE)
    def control_update(self, request: ControlRequest) -> ControlResult:
        """Accept a valid action (the validator ran first) and answer the status it leads to;
        the main flow persists it (row, audit for non-API sources, search attributes)."""
        control.accept(
            self._state,
            OperatorAction(
                action=request.action,
                reason=request.reason,
                actor=request.actor or "api",
                source=request.source,
                correlation_id=request.correlation_id or self._state.correlation_id,
                force=request.force,
            ),
        )
        return ControlResult(
            action=request.action,
            status=control.projected_status(self._state),
            paused=self._state.paused,
        )

    @control_update.validator
    def validate_control(self, request: ControlRequest) -> None:
        refusal = control.refusal(self._state, request.action)
        if refusal is not None:
            raise ValueError(refusal)

    @workflow.query(name="progress")
    def progress(self) -> RolloutState:
        return self._state

    # --- Run --------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: RolloutInput) -> RolloutResult:
        s = self._state
        try:
            if not s.expanded:
                await self._set_status(
                    RolloutStatus.RUNNING, action="rollout.started", waiting_for="targets"
                )
                expansion = await self._expand_targets()
                s.stages = expansion.stages
                s.stage_count = len(expansion.stages)
                s.policy = expansion.policy
                s.expanded = True
                s.counts.targeted = expansion.targeted
            else:
                workflow.set_current_details(self._details())

            while s.stop_requested is None and s.current_stage < len(s.stages):
                await self._run_stage(s.stages[s.current_stage])
                if s.stop_requested is None and s.phase == "done":
                    s.current_stage += 1
                    s.phase = "window"
                self._maybe_continue_as_new()

            if s.stop_requested == "abort":
                await self._abort()
            elif s.stop_requested == "rollback":
                await self._rollback()
            else:
                await self._set_status(
                    RolloutStatus.COMPLETED, action="rollout.completed", waiting_for=None
                )
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
        if s.phase == "window":
            if not await self._wait_for_window():
                return
            s.phase = "issue"
        if s.phase == "issue":
            await self._issue(stage)
            s.phase = "bake"
        if s.phase == "bake":
            assert s.bake_until is not None
            if await self._bake(STAGE_BAKE, stage, s.bake_until):
                s.phase = "done"

    async def _wait_for_window(self) -> bool:
        """Hold until the maintenance window is open and the rollout not paused. False when a
        stop (abort, rollback) was requested meanwhile."""
        s = self._state
        while True:
            await self._drain_actions()
            if s.stop_requested is not None:
                return False
            if s.paused:
                await self._wait_for_operator()
                continue
            now = workflow.now()
            opens = next_window_start(now, s.policy.window)
            if opens is not None and opens <= now:
                return True
            waiting = (
                f"the maintenance window, opening at {iso(opens)}"
                if opens is not None
                else "a maintenance window (none is configured to open)"
            )
            await self._set_status(
                RolloutStatus.RUNNING,
                action="rollout.waiting_for_window",
                status_reason=StatusReason.OUTSIDE_MAINTENANCE_WINDOW,
                waiting_for=waiting,
            )
            await self._sleep_until(opens)
            self._maybe_continue_as_new()

    async def _issue(self, stage: StagePlan) -> None:
        s = self._state
        await self._set_status(
            RolloutStatus.RUNNING,
            action="rollout.stage_started",
            waiting_for=f"issuing {stage.name} ({stage.size} vehicles)",
        )
        now = workflow.now()
        if stage.size > 0:
            issued = await self._issue_stage(stage, now)
            s.counts = issued.counts
            if s.first_issued_at is None:
                s.first_issued_at = now
        s.next_stage = stage.index + 1
        s.bake_until = workflow.now() + timedelta(seconds=stage.bake_seconds)

    async def _bake(self, kind: BakeKind, stage: StagePlan, until: datetime) -> bool:
        """Bake `stage` until `until` (a durable deadline kept in the state, so it survives
        continue-as-new) with a gate tick every interval. True when the gates let it proceed;
        False when a stop is pending, or when the gate of a stage's bake asks for a rollback.
        A failing gate pauses it. A pause holds the ticks (nothing is issued or retried while
        paused) but not the bake clock."""
        s = self._state
        interval = self._input.gate_interval_seconds or min(
            MAX_GATE_INTERVAL, max(1, stage.bake_seconds)
        )
        baking = f"{kind.label} of {stage.name} until {iso(until)}"
        if not s.paused:
            if kind.announce_at_start:
                await self._announce_bake(kind, baking)
            elif s.waiting_for != baking:
                self._flow_waiting = baking
        while True:
            await self._drain_actions()
            if control.stop_pending(s):
                return False
            if s.paused:
                await self._wait_for_operator()
                continue
            now = workflow.now()
            bake_done = now >= until
            if stage.size == 0:
                decision = GateDecision(action=GateAction.PROCEED if bake_done else GateAction.WAIT)
            else:
                decision = await self._gate_tick(stage, bake_done, rollback=kind.rollback)
            if decision.action == GateAction.PROCEED:
                return True
            if decision.action == GateAction.ROLLBACK and not kind.rollback:
                control.rollback_by_gate(s, decision)
                return False
            if decision.action in (GateAction.PAUSE, GateAction.ROLLBACK):
                control.pause_by_gate(s, decision)
                self._flow_waiting = baking
                await self._set_status(
                    RolloutStatus.PAUSED,
                    action=kind.gate_failed_action,
                    status_reason=decision.reason,
                    waiting_for=kind.waiting_for_operator,
                    reason=decision.detail,
                    keep_flow_waiting=True,
                )
                continue
            if s.waiting_for != baking:
                await self._announce_bake(kind, baking)
            self._maybe_continue_as_new()
            await self._sleep_until(min(now + timedelta(seconds=interval), until))

    async def _announce_bake(self, kind: BakeKind, baking: str) -> None:
        s = self._state
        await self._set_status(
            kind.status,
            action=kind.baking_action,
            status_reason=s.stop_reason if kind.rollback else None,
            waiting_for=baking,
        )

    async def _rollback(self) -> None:
        """Staged rollback: the last issued stage first, down to the canary. Each stage's
        targets get the rollback desired state, then a bake of min(stage bake, 300 s) gated by
        the failure threshold over the rollback's own outcomes: a breach pauses the rollback
        (FAILURE_THRESHOLD) before the next stage goes out; resume continues it, abort stops
        it. Targets that never report fail with APPLY_TIMEOUT (a rollback failure)."""
        s = self._state
        operator = s.stop_action if s.stop_reason == StatusReason.OPERATOR else None
        if s.rollback_next is None:
            control.start_rollback(s)
            await self._set_status(
                RolloutStatus.ROLLING_BACK,
                action="rollout.rollback_started",
                status_reason=s.stop_reason,
                waiting_for="vehicles to be returned to their previous desired state",
                operator=operator,
                reason=None if operator else (s.stop_action.reason if s.stop_action else None),
            )
        while s.rollback_next is not None and s.rollback_next >= 0:
            stage = s.stages[s.rollback_next]
            s.stage, s.stage_index = stage.name, stage.index
            if s.rollback_phase == "issue":
                await self._set_status(
                    RolloutStatus.ROLLING_BACK,
                    action="rollout.rollback_stage",
                    status_reason=s.stop_reason,
                    waiting_for=f"returning {stage.name} to the previous desired state",
                )
                result = await self._rollback_targets(stage.index)
                s.counts = result.counts
                s.rollback_bake_until = workflow.now() + timedelta(
                    seconds=min(stage.bake_seconds, ROLLBACK_MAX_BAKE)
                )
                s.rollback_phase = "bake"
            assert s.rollback_bake_until is not None
            if not await self._bake(ROLLBACK_BAKE, stage, s.rollback_bake_until):
                await self._abort()
                return
            s.rollback_next -= 1
            s.rollback_phase = "issue"
            self._maybe_continue_as_new()
        # Whatever is left (targets never issued are skipped).
        s.counts = (await self._rollback_targets(None)).counts
        await self._set_status(
            RolloutStatus.ROLLED_BACK,
            action="rollout.rolled_back",
            status_reason=s.stop_reason,
            waiting_for=None,
        )
