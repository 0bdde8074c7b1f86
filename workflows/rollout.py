"""`RolloutWorkflow`: one workflow per rollout, id `rollout-{id}`.

Sequencing only: every rule is a pure function (`workflows.policy` for stages and gates,
`workflows.control` for operator transitions), every read and write an activity, called by the
steps this class inherits (`workflows.steps`: activity calls, status writes, durable waits).
Vehicle lists never enter the history: activities return counts and the stage plan.

A stage is judged on what its vehicles reported, never on the clock alone (SPEC.md):
1. window: a durable timer until the maintenance window opens (statusReason
   OUTSIDE_MAINTENANCE_WINDOW meanwhile);
2. issue: the desired state goes out in batches; the failure threshold is checked between
   batches over the rollout's counters, and a breach stops issuing at once (the rest of the
   stage stays planned: held, then issued on when an operator resumes);
3. settle: until every vehicle issued in the stage has an outcome (`policy.unsettled`:
   ready, failed for good, APPLY_TIMEOUT, blocked); `waitingFor` says how many are left;
4. bake: `bakeSeconds` from the moment it settled (a durable deadline), late failures still
   counting; then the judge: the canary must be healthy (else CANARY_UNHEALTHY), the last
   stage waits for the whole rollout to have settled (`completed` means every vehicle has an
   outcome).
While it settles and bakes, gates are evaluated at each gate tick (every `min(60, bake)` s;
60 s while settling), after the sweeps due (apply timeouts; retries and re-checks of blocked
vehicles only inside the window), and whenever the ingest path signals new outcomes
(`outcomes`, coalesced per rollout; the gates only): the failure threshold pauses (or rolls
back, as its `action` says) within seconds of the telemetry that crossed it.

Operators: the `control` Update (the API; a validator refuses an invalid transition at once)
and the `pause` / `resume` / `rollback` / `abort` signals (the `temporal` CLI, SPEC's JSON body)
go through one path: `control.refusal` decides whether the action is valid now,
`control.accept` records it in the state; the main flow persists it (status row, search
attributes, current details, and an audit entry as source `temporal`, unless the Update
carries the API's marker, `ApiRequestMarker`: the API has audited it). A refused signal, or a
refused Update without the API's marker, is kept (`control.refuse`) and audited by the main
flow at its next wake-up (`rollout.{action}_refused`, result `refused`). Handlers never await,
so they need no lock.

Resume after a gate pause (`control.acknowledge_resume`): FAILURE_THRESHOLD - the failures seen
so far are acknowledged (they no longer count; new failures beyond the threshold pause again).
CANARY_UNHEALTHY - the canary is evaluated again (more vehicles may have reported since); still
unhealthy, the rollout pauses again, unless the operator resumes with `force: true` (audited
with its reason).

Rollback: staged, last issued stage first, each touched vehicle back to its previous desired
state (declarative: new desired states); each returned stage issues, settles and bakes
min(its bake, 300 s) under the failure threshold over the rollback's own outcomes, and a
breach pauses the rollback (FAILURE_THRESHOLD) before the next stage (resume continues it,
abort stops it). Abort: stops; never-issued targets are skipped.

Versioning: runs that recorded the `settle-before-bake` marker settle; runs started before it
(no marker in their history) go from issue straight to bake as they always did, so running
rollouts replay (tests/workflows/test_history.py replays a saved run of each).

History stays bounded: continue-as-new when Temporal suggests it, carrying `RolloutState`;
the run resumes from the stage and phase it was in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.temporal import (
        CONTROL_REFUSED,
        CONTROL_UPDATE,
        OUTCOMES_SIGNAL,
        ROLLOUT_WORKFLOW_TYPE,
    )
    from models.enums import AuditSource, RolloutStatus, StatusReason
    from models.workflows import (
        ApiRequestMarker,
        ControlAction,
        ControlRefusal,
        ControlRequest,
        ControlResult,
        EvaluateGatesResult,
        GateAction,
        GateCounts,
        GateDecision,
        OperatorAction,
        OutcomesSignal,
        RolloutInput,
        RolloutResult,
        RolloutSignal,
        RolloutState,
        StagePlan,
    )
    from workflows import control
    from workflows.policy import counted_total, next_window_start, settle_detail

from workflows.steps import RolloutAlreadyFinished, RolloutSteps, iso

MAX_GATE_INTERVAL = 60
# A rollback stage bakes min(its bake, this) before the next stage is returned.
ROLLBACK_MAX_BAKE = 300
# Between gate ticks, a settling stage's progress reaches the row at most this often.
SETTLE_NOTE_SECONDS = 5


@dataclass(frozen=True)
class WatchKind:
    """What differs between watching a stage (settle, then bake) and watching a rollback
    stage (`_watch` runs both)."""

    label: str  # waiting_for while baking: "{label} of {stage} until {deadline}"
    status: RolloutStatus  # the status while settling and baking
    settling_action: str  # the status write that says what the settle waits for
    baking_action: str  # audit action when the bake is announced
    gate_failed_action: str  # audit action when a failing gate pauses it
    waiting_for_operator: str  # waiting_for while a failing gate holds it
    # The rollback's watch: its gate counts the rollback's own outcomes (and the failures
    # acknowledged on resuming it), its status carries the stop's reason, and a failure
    # threshold pauses it whatever the gate's action (a stage's bake rolls back if it says so).
    rollback: bool
    # Where it keeps its phase ("settle", "bake") and its bake deadline in `RolloutState`.
    phase_field: str
    until_field: str


STAGE_WATCH = WatchKind(
    label="bake",
    status=RolloutStatus.RUNNING,
    settling_action="rollout.settling",
    baking_action="rollout.baking",
    gate_failed_action="rollout.gate_failed",
    waiting_for_operator="an operator (resume, rollback or abort)",
    rollback=False,
    phase_field="phase",
    until_field="bake_until",
)
ROLLBACK_WATCH = WatchKind(
    label="rollback bake",
    status=RolloutStatus.ROLLING_BACK,
    settling_action="rollout.rollback_settling",
    baking_action="rollout.rollback_baking",
    gate_failed_action="rollout.rollback_gate_failed",
    waiting_for_operator="an operator (resume or abort)",
    rollback=True,
    phase_field="rollback_phase",
    until_field="rollback_bake_until",
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
        # New outcomes were signalled since the gates last looked (`outcomes`).
        self._outcomes_changed = False
        # When the settle's progress was last written to the row.
        self._noted_at: datetime | None = None

    # --- Control: one path for the Update and the signals -----------------------------------

    def _operator(
        self,
        action: ControlAction,
        body: RolloutSignal | ControlRequest,
        marker: ApiRequestMarker | None = None,
    ) -> OperatorAction:
        """The operator's action as the workflow records it: source `temporal` whatever the
        body claims; only a claimed API marker spares it the workflow's own audit entry."""
        return OperatorAction(
            action=action,
            reason=body.reason,
            actor=body.actor or "temporal",
            source=AuditSource.TEMPORAL,
            correlation_id=body.correlation_id or self._state.correlation_id,
            force=body.force,
            api_marker=marker,
            accepted_at=workflow.now(),
            seq=control.next_seq(self._state),
        )

    def _refuse(
        self, operator: OperatorAction, message: str, *, via: Literal["signal", "update"]
    ) -> None:
        """Keep a refusal for the main flow to audit (`rollout.{action}_refused`); a run from
        before refusals were audited only logs it (it replays as it ran)."""
        workflow.logger.warning("%s refused: %s", via, message)
        if not self._judged_by_outcomes():
            return
        control.refuse(
            self._state,
            ControlRefusal(
                id=str(workflow.uuid4()),
                action=operator.action,
                via=via,
                message=message,
                status=control.projected_status(self._state),
                at=workflow.now(),
                actor=operator.actor or "temporal",
                reason=operator.reason,
                correlation_id=operator.correlation_id,
                seq=operator.seq,
            ),
        )

    def _signal(self, name: ControlAction, body: RolloutSignal | None) -> None:
        operator = self._operator(name, body or RolloutSignal())
        refusal = control.refusal(self._state, name)
        if refusal is not None:
            self._refuse(operator, refusal, via="signal")
            return
        control.accept(self._state, operator)

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

    @workflow.signal(name=OUTCOMES_SIGNAL)
    def outcomes(self, body: OutcomesSignal | None = None) -> None:
        """New outcomes of this rollout's vehicles are committed: the gates look again."""
        self._state.outcome_signals += 1
        self._outcomes_changed = True

    @workflow.update(name=CONTROL_UPDATE)
    def control_update(self, request: ControlRequest) -> ControlResult:
        """Accept a valid action and answer the status it leads to; the main flow persists
        it (row, search attributes, and the audit entry unless the API's marker proves that
        the API audited it). An invalid one gets here only without a usable API marker (the
        validator let it through): its refusal is kept for the audit, then the Update fails
        with `ControlRefused`."""
        s = self._state
        refusal = control.refusal(s, request.action)
        if refusal is not None:
            self._refuse(self._operator(request.action, request), refusal, via="update")
            raise ApplicationError(refusal, type=CONTROL_REFUSED, non_retryable=True)
        marker = control.claim_api_marker(s, request.api_marker, workflow.now())
        control.accept(s, self._operator(request.action, request, marker))
        return ControlResult(
            action=request.action,
            status=control.projected_status(s),
            paused=s.paused,
        )

    @control_update.validator
    def validate_control(self, request: ControlRequest) -> None:
        """Refuse an invalid transition at once, before anything reaches the history, when
        the Update comes from the API (it carries an unused marker; the API audits the
        refusal itself). Any other Update is let through so that its handler audits the
        refusal: Temporal keeps nothing of a rejected Update."""
        if not control.marker_claimable(self._state, request.api_marker):
            return
        refusal = control.refusal(self._state, request.action)
        if refusal is not None:
            raise ApplicationError(refusal, type=CONTROL_REFUSED, non_retryable=True)

    @workflow.query(name="progress")
    def progress(self) -> RolloutState:
        return self._state

    # --- Run --------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: RolloutInput) -> RolloutResult:
        s = self._state
        self._judged_by_outcomes()  # a new run records its rules first
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
        except RolloutAlreadyFinished:
            # Its row is terminal already (aborted while its workflow was not started yet):
            # nothing was issued, nothing is; the run ends with the row's status.
            workflow.logger.warning("rollout %s is %s already: ending", s.rollout_id, s.status)
        except ActivityError as err:
            await self._fail(err)
            raise ApplicationError(
                f"rollout {s.rollout_id} failed: {err.cause or err}", type="RolloutFailed"
            ) from err
        await self._drain_refusals()  # refused while it stopped (audited after the stop)
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
            if not await self._issue(stage):
                s.phase = "window"  # a breach stopped issuing: held, then issued on
                return
            if self._judged_by_outcomes():
                s.phase, s.bake_until = "settle", None
            else:
                s.phase = "bake"
        if s.phase in ("settle", "bake") and await self._watch(STAGE_WATCH, stage):
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
            judged = self._judged_by_outcomes()
            if not judged or (s.waiting_for, s.status_reason) != (
                waiting,
                StatusReason.OUTSIDE_MAINTENANCE_WINDOW,
            ):
                await self._set_status(
                    RolloutStatus.RUNNING,
                    action="rollout.waiting_for_window",
                    status_reason=StatusReason.OUTSIDE_MAINTENANCE_WINDOW,
                    waiting_for=waiting,
                )
            # Outcomes of earlier stages wake it only to continue-as-new when suggested.
            await self._sleep_until(opens, outcomes=judged)
            self._outcomes_changed = False
            self._maybe_continue_as_new()

    async def _issue(self, stage: StagePlan) -> bool:
        """Issue the stage (batched; the failure threshold and the window checked between
        batches). False when that stopped it: a breach pauses the rollout (or rolls it back);
        a closed window holds the rest of the stage until it opens."""
        s = self._state
        await self._set_status(
            RolloutStatus.RUNNING,
            action="rollout.stage_started",
            waiting_for=f"issuing {stage.name} ({stage.size} vehicles)",
        )
        now = workflow.now()
        s.next_stage = stage.index + 1  # (a rollback returns it, even partly issued)
        if stage.size > 0:
            issued = await self._issue_stage(stage, now)
            s.counts = issued.counts
            if s.first_issued_at is None:
                s.first_issued_at = now
            if issued.halted is not None:
                if issued.halted.reason == StatusReason.OUTSIDE_MAINTENANCE_WINDOW:
                    return False  # the rest waits for the window to open again
                s.last_total = counted_total(issued.counts)  # what a resume acknowledges
                await self._gate_stops(STAGE_WATCH, issued.halted, f"issuing {stage.name}")
                return False
        s.next_tick_at = None
        s.bake_until = workflow.now() + timedelta(seconds=stage.bake_seconds)
        return True

    async def _watch(self, kind: WatchKind, stage: StagePlan) -> bool:
        """Settle, then bake, `stage` (or, `kind.rollback`, its rollback), judged by what its
        vehicles report. Settle: until every vehicle issued in it has an outcome. Bake: then
        `bakeSeconds` (a durable deadline kept in the state, so it survives continue-as-new)
        during which late failures still count. True when the gates let it proceed; False when
        a stop is pending, or when the gate of a stage asks for a rollback. A failing gate
        pauses it; a pause holds the watch (nothing is issued or retried) but not the bake
        clock.

        The gates are evaluated at each gate tick (every `min(60, bake)` s, sweeps first), at
        the bake's deadline, and whenever the ingest path signals new outcomes (`outcomes`:
        the gates only, no sweeps), so a breach stops the rollout within seconds."""
        s = self._state
        if getattr(s, kind.phase_field) == "bake":  # as runs before settling did
            if not s.paused and not kind.rollback:
                await self._announce_bake(kind, self._baking(kind, stage))
            elif not s.paused and s.waiting_for != self._baking(kind, stage):
                self._flow_waiting = self._baking(kind, stage)
        while True:
            await self._drain_actions()
            if control.stop_pending(s):
                return False
            if s.paused:
                await self._wait_for_operator()
                continue
            now = workflow.now()
            until: datetime | None = getattr(s, kind.until_field)
            settling = getattr(s, kind.phase_field) == "settle"
            bake_done = not settling and until is not None and now >= until
            signalled_only = self._outcomes_changed and not self._timer_woke(now, until)
            self._outcomes_changed = False
            # A tick: the sweeps, then every count. Runs judged by outcomes tick on their
            # timer only (an operator's wake-up is no tick); runs from before ticked at every
            # wake-up that was not an outcome signal (they replay as they ran).
            tick = self._tick_due(now) if self._judged_by_outcomes() else not signalled_only
            quick = signalled_only and not bake_done and self._judged_by_outcomes()
            result = await self._judge(stage, bake_done, kind, sweeps=tick, quick=quick)
            if tick:
                s.next_tick_at = now + timedelta(seconds=self._interval(stage, settling))
            decision = result.decision
            if decision.action == GateAction.ROLLBACK and not kind.rollback:
                control.rollback_by_gate(s, decision)
                return False
            if decision.action in (GateAction.PAUSE, GateAction.ROLLBACK):
                flow = s.waiting_for if settling else self._baking(kind, stage)
                await self._gate_stops(kind, decision, flow or self._baking(kind, stage))
                continue
            if settling and result.settled:
                await self._start_bake(kind, stage, now)
                continue
            if bake_done and decision.action == GateAction.PROCEED:
                return True
            await self._say_waiting(kind, stage, settling, result, tick=tick)
            self._maybe_continue_as_new()
            wake = s.next_tick_at
            # The bake's deadline, while it is ahead (once past, a stage that un-settled
            # meanwhile waits for its vehicles: the next tick, or their outcomes).
            if until is not None and not settling and now < until:
                wake = until if wake is None else min(wake, until)
            await self._sleep_until(wake, outcomes=True)

    def _interval(self, stage: StagePlan, settling: bool) -> int:
        """Seconds between gate ticks: min(60, bake) while baking, 60 while settling (new
        outcomes wake it at once anyway); `gate_interval_seconds` when the input sets it."""
        if self._input.gate_interval_seconds:
            return self._input.gate_interval_seconds
        return MAX_GATE_INTERVAL if settling else min(MAX_GATE_INTERVAL, max(1, stage.bake_seconds))

    def _tick_due(self, now: datetime) -> bool:
        s = self._state
        return s.next_tick_at is None or now >= s.next_tick_at

    def _timer_woke(self, now: datetime, until: datetime | None) -> bool:
        """Whether a gate tick or the bake's deadline is due (else only a signal woke it)."""
        return self._tick_due(now) or (until is not None and now >= until)

    async def _judge(
        self, stage: StagePlan, bake_done: bool, kind: WatchKind, *, sweeps: bool, quick: bool
    ) -> EvaluateGatesResult:
        if not stage.size:  # settled from the start; it proceeds once its bake is over
            action = GateAction.PROCEED if bake_done else GateAction.WAIT
            return EvaluateGatesResult(
                total=GateCounts(),
                stage=GateCounts(),
                decision=GateDecision(action=action),
                counts=self._state.counts,
            )
        return await self._gate_tick(
            stage, bake_done, rollback=kind.rollback, sweeps=sweeps, quick=quick
        )

    async def _start_bake(self, kind: WatchKind, stage: StagePlan, now: datetime) -> None:
        """The stage settled: its bake starts now, announced."""
        s = self._state
        setattr(s, kind.phase_field, "bake")
        setattr(s, kind.until_field, now + timedelta(seconds=self._bake_seconds(kind, stage)))
        await self._announce_bake(kind, self._baking(kind, stage))

    async def _say_waiting(
        self,
        kind: WatchKind,
        stage: StagePlan,
        settling: bool,
        result: EvaluateGatesResult,
        *,
        tick: bool,
    ) -> None:
        """What it waits for: while settling "settle of canary: 3 of 5 vehicles still
        applying" (the Web UI's current details at every evaluation; the row, and its stream
        event, at each gate tick and at most every SETTLE_NOTE_SECONDS in between); while
        baking, the bake's deadline."""
        s = self._state
        if not settling:
            if s.waiting_for != self._baking(kind, stage):
                await self._announce_bake(kind, self._baking(kind, stage))
            return
        if not result.stage_counted:  # a quick look: the count is the last one written
            return
        waiting = f"settle of {stage.name}: {settle_detail(result.stage)}"
        now = workflow.now()
        due = (
            tick
            or not (s.waiting_for or "").startswith("settle")
            or self._noted_at is None
            or now >= self._noted_at + timedelta(seconds=SETTLE_NOTE_SECONDS)
        )
        if s.waiting_for != waiting and due:
            self._noted_at = now
            await self._set_status(
                kind.status,
                action=kind.settling_action,
                status_reason=s.stop_reason if kind.rollback else None,
                waiting_for=waiting,
            )
        else:
            workflow.set_current_details(self._details(waiting))

    def _bake_seconds(self, kind: WatchKind, stage: StagePlan) -> int:
        return min(stage.bake_seconds, ROLLBACK_MAX_BAKE) if kind.rollback else stage.bake_seconds

    def _baking(self, kind: WatchKind, stage: StagePlan) -> str:
        return f"{kind.label} of {stage.name} until {iso(getattr(self._state, kind.until_field))}"

    async def _gate_stops(self, kind: WatchKind, decision: GateDecision, flow: str) -> None:
        """A failing gate: the rollout rolls back (a stage's gate that says so), or is held
        (paused, with the gate's reason) until an operator acts; `flow` is what it waits for
        once resumed."""
        s = self._state
        if decision.action == GateAction.ROLLBACK and not kind.rollback:
            control.rollback_by_gate(s, decision)
            return
        control.pause_by_gate(s, decision)
        self._flow_waiting = flow
        await self._set_status(
            RolloutStatus.PAUSED,
            action=kind.gate_failed_action,
            status_reason=decision.reason,
            waiting_for=kind.waiting_for_operator,
            reason=decision.detail,
            keep_flow_waiting=True,
        )

    async def _announce_bake(self, kind: WatchKind, baking: str) -> None:
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
                s.next_tick_at = None
                if self._judged_by_outcomes():
                    s.rollback_phase, s.rollback_bake_until = "settle", None
                else:
                    s.rollback_bake_until = workflow.now() + timedelta(
                        seconds=self._bake_seconds(ROLLBACK_WATCH, stage)
                    )
                    s.rollback_phase = "bake"
            if not await self._watch(ROLLBACK_WATCH, stage):
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
