"""Workflow, activity, signal and update payloads (the rollout's and the reconcile's), the
rollout's state and its defaults. Nothing here carries a vehicle list: workflows pass ids,
counts, stage numbers, cutoffs and cursors; vehicles stay in PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.defaults import (
    DEFAULT_APPLY_SECONDS,
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_FAILURE_ACTION,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MIN_BATTERY_PERCENT,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_MIN_SUCCESS_RATE,
    DEFAULT_OFFLINE_AFTER_SECONDS,
    DEFAULT_REQUIRE_STATIONARY,
    DEFAULT_ROLLOUT_START_GRACE_SECONDS,
    ISSUE_BATCH_SIZE,
    OFFLINE_BATCH_SIZE,
    PENDING_START_BATCH_SIZE,
    SWEEP_BATCH_SIZE,
    FailureAction,
)
from models.enums import WEEKDAYS, AuditSource, RolloutStatus, StatusReason

# What an operator may ask of a running rollout (the `control` Update, the signals).
ControlAction = Literal["pause", "resume", "rollback", "abort"]
# The stop a rollout is asked to make (by an operator, or by its failure-threshold gate).
StopRequest = Literal["abort", "rollback"]
# Where the current stage is: window -> issue -> settle -> bake -> done. Runs started before
# settling existed (no `settle-before-bake` marker in their history) go issue -> bake.
StagePhase = Literal["window", "issue", "settle", "bake", "done"]
# Where the rollback of one stage is: issue -> settle -> bake (then the next stage).
RollbackPhase = Literal["issue", "settle", "bake"]


class RolloutInput(BaseModel):
    """What starts `RolloutWorkflow`: the rollout row is the source of truth for the rest.

    `state` is set only by continue-as-new (the run resumes from it). `gate_interval_seconds`
    overrides how often gates are evaluated while a stage bakes (default: min(60, bake))."""

    rollout_id: int
    release_version: str
    correlation_id: str | None = None
    gate_interval_seconds: int | None = None
    # Continue-as-new once a run's history reaches this many events (tests); None: only when
    # Temporal suggests it.
    continue_as_new_after_events: int | None = None
    # Targets per batch when issuing (tests; None: ISSUE_BATCH_SIZE).
    issue_batch_size: int | None = None
    state: RolloutState | None = None


class StagePlan(BaseModel):
    """One stage of a rollout: the vehicles of ranks [start_rank, end_rank) (cumulative)."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    start_rank: int
    end_rank: int
    bake_seconds: int = 0

    @property
    def size(self) -> int:
        return self.end_rank - self.start_rank


class RolloutCounts(BaseModel):
    """The progress counters of a rollout row (`rollouts.targeted`, `notified`, ...)."""

    targeted: int = 0
    notified: int = 0
    updating: int = 0
    succeeded: int = 0
    failed: int = 0
    blocked: int = 0
    pending: int = 0


# --- Signals -------------------------------------------------------------------------------


class RolloutSignal(BaseModel):
    """Body of the `pause`, `resume`, `abort` and `rollback` signals (every field optional).

    A signal comes through Temporal (the CLI, the Web UI), never from the API (which sends
    the `control` Update): the workflow audits it as source `temporal` whatever its body
    claims (SPEC.md), so `source` is accepted and ignored. A signal the workflow refuses is
    audited too (`rollout.{action}_refused`, result `refused`).
    """

    reason: str | None = None
    actor: str | None = None
    source: str | None = None
    correlation_id: str | None = Field(default=None, alias="correlationId")
    # resume only: pass a canary that is still unhealthy (the operator takes responsibility).
    force: bool = False

    model_config = ConfigDict(populate_by_name=True)


class OutcomesSignal(BaseModel):
    """Body of the `outcomes` signal: the ingest path's "look again" after it committed
    outcomes of this rollout's vehicles (coalesced: at most one per rollout per short
    interval per process). The gates read the counts from PostgreSQL, never from here."""

    events: int = 0


# --- Workflow state and result -------------------------------------------------------------


# How old the API's audit entry of a control request may be when the workflow accepts the
# request and skips its own entry (`ApiRequestMarker`); an older one is audited again.
API_MARKER_MAX_AGE = timedelta(minutes=10)
# How long the workflow remembers the markers it has accepted (the age above plus a margin for
# the clocks of PostgreSQL and the worker), and how many at most.
API_MARKER_MEMORY = API_MARKER_MAX_AGE + timedelta(minutes=5)
API_MARKER_MEMORY_SIZE = 100
# Refused signals (and Updates) kept until the main flow audits them; more are counted.
MAX_PENDING_REFUSALS = 20


class ApiRequestMarker(BaseModel):
    """What proves that a `control` Update comes from the REST API, which has audited the
    request itself (`rollout.{action}_requested`, source `api`): the id of that audit entry
    and a random nonce whose SHA-256 the entry's payload holds (`markerSha256`).

    Only the API knows the nonce before the Update is sent, and PostgreSQL is written only by
    Motorcade: someone with the `temporal` CLI cannot forge it. An accepted Update is in the
    workflow's history, where the nonce can be read; so the workflow accepts each marker once
    (it remembers the ids it accepted, `RolloutState.api_claims`) and only while its entry is
    recent (`API_MARKER_MAX_AGE`). The `update_rollout_status` activity checks the entry
    (`services.rollouts.control.api_request_verified`); whatever fails a check is audited
    by the workflow as source `temporal`. Chosen over an HMAC with a shared secret: no key to
    distribute to the API and the worker, and the API's entry is proven to exist.
    """

    audit_id: int
    nonce: str = Field(min_length=16, max_length=128)


class ControlRequest(BaseModel):
    """Input of the `control` Update, the API's way to steer a running rollout (the `temporal`
    CLI may send it too). The API's Update carries `api_marker` (the proof that the API has
    audited the request); its validator refuses an invalid transition at once, and the API
    answers 409 INVALID_STATE_TRANSITION (audited by the API as `rollout.{action}_rejected`).

    Any other Update (no marker, or one already used) comes through Temporal: the workflow
    audits it as source `temporal`, actor from the body, whatever its `source` says (the
    field is accepted for old clients and ignored). The validator lets such an Update through
    even when it is invalid now, so that the handler can audit the refusal
    (`rollout.{action}_refused`, result `refused`) before it fails the Update with an
    `ApplicationError` of type `ControlRefused`: the caller still sees the refusal."""

    action: ControlAction
    reason: str
    actor: str | None = None
    source: str | None = None  # ignored: the marker, not this field, says where it came from
    correlation_id: str | None = None
    # resume only: pass a canary that is still unhealthy (the operator takes responsibility).
    force: bool = False
    api_marker: ApiRequestMarker | None = None


class ControlResult(BaseModel):
    """What the `control` Update answers: the rollout's status once the action is accepted."""

    action: ControlAction
    status: RolloutStatus
    paused: bool


class OperatorAction(BaseModel):
    """An operator's action (a signal or the `control` Update) accepted and not yet persisted
    (audited and written to the rollout row). `api_marker`: the API's proof, accepted once
    by the workflow (`control.claim_api_marker`); `accepted_at`: the workflow's time when it
    accepted the action (the marker's entry must be recent then)."""

    action: ControlAction
    reason: str | None = None
    actor: str | None = None
    source: AuditSource = AuditSource.TEMPORAL
    correlation_id: str | None = None
    force: bool = False
    api_marker: ApiRequestMarker | None = None
    accepted_at: datetime | None = None
    # Order among the signals and Updates this workflow received (RolloutState.control_seq),
    # so refusals are audited in the order they happened around accepted actions.
    seq: int = 0


class ApiMarkerClaim(BaseModel):
    """An API marker the workflow has accepted (never accepted again), and when."""

    audit_id: int
    at: datetime


class ControlRefusal(BaseModel):
    """A signal (or a `control` Update that did not come from the API) the workflow refused,
    waiting for the main flow to audit it (`record_control_refusals`). `id` (from
    `workflow.uuid4()`) makes the audit entry idempotent."""

    id: str
    action: ControlAction
    via: Literal["signal", "update"]
    message: str
    status: RolloutStatus  # the status the rollout was in (or moving to) when it refused
    at: datetime
    actor: str = "temporal"
    reason: str | None = None
    correlation_id: str | None = None
    seq: int = 0  # as OperatorAction.seq


# --- Gates and policy ----------------------------------------------------------------------


class GateCounts(BaseModel):
    """Targets per state (one stage or the whole rollout), from `rollout_targets`."""

    notified: int = 0
    updating: int = 0
    succeeded: int = 0
    failed: int = 0
    blocked: int = 0
    # failed with a retryable reason and attempts left (work for retry_failed_targets)
    retryable: int = 0
    # of `notified` and `updating`: notified again by the blocked re-check, not waited for by
    # the settle (an old history's counts lack it: 0)
    rechecked: int = 0

    @property
    def issued(self) -> int:
        """Targets whose desired state went out (the denominator of the failure threshold)."""
        return self.notified + self.updating + self.succeeded + self.failed + self.blocked


class GatePolicy(BaseModel):
    min_success_rate: float = DEFAULT_MIN_SUCCESS_RATE
    min_samples: int = DEFAULT_MIN_SAMPLES
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    failure_action: FailureAction = DEFAULT_FAILURE_ACTION


class Sweep(StrEnum):
    """A housekeeping pass over a rollout's targets while a stage bakes, by the activity that
    runs it (`policy.sweeps_due` says which a gate tick runs)."""

    EXPIRE_APPLY_TIMEOUTS = "expire_apply_timeouts"
    RETRY_FAILED_TARGETS = "retry_failed_targets"
    RECHECK_BLOCKED = "recheck_blocked"


class GateAction(StrEnum):
    """What a gate decision asks of the workflow (written by `policy.decide`, read by the
    workflow and the evaluate_gates activity)."""

    PROCEED = "proceed"
    WAIT = "wait"
    PAUSE = "pause"
    ROLLBACK = "rollback"


class GateDecision(BaseModel):
    """What `policy.decide` answers: proceed, wait, pause(reason) or rollback(reason)."""

    action: GateAction
    reason: StatusReason | None = None  # FAILURE_THRESHOLD, CANARY_UNHEALTHY
    detail: str | None = None


class MaintenanceWindowSpec(BaseModel):
    """`gates.safetyChecks.maintenanceWindow`: local wall-clock start/end ("HH:MM"), zone,
    days ("mon".."sun", the day the window opens)."""

    start: str
    end: str
    timezone: str = "UTC"
    days: list[str] = Field(default_factory=lambda: [str(day) for day in WEEKDAYS])


class RolloutPolicy(BaseModel):
    """A rollout's gates, safety checks, timeouts and retry settings, as the workflow and its
    activities use them (parsed from the rollout row by `policy.rollout_policy`)."""

    gates: GatePolicy = Field(default_factory=GatePolicy)
    window: MaintenanceWindowSpec | None = None
    require_stationary: bool = DEFAULT_REQUIRE_STATIONARY
    min_battery_percent: int = DEFAULT_MIN_BATTERY_PERCENT
    apply_seconds: int = DEFAULT_APPLY_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_seconds: int = DEFAULT_BACKOFF_SECONDS


class RolloutState(BaseModel):
    """Everything the workflow knows; what `progress` answers and continue-as-new would carry."""

    rollout_id: int
    release_version: str
    correlation_id: str | None = None
    status: RolloutStatus = RolloutStatus.PENDING
    status_reason: StatusReason | None = None
    stage: str | None = None
    stage_index: int = 0
    stage_count: int = 0
    stages: list[StagePlan] = Field(default_factory=list)
    # Index of the next stage to issue (stages before it are issued and baked).
    next_stage: int = 0
    expanded: bool = False
    paused: bool = False
    stop_requested: StopRequest | None = None
    waiting_for: str | None = None
    counts: RolloutCounts = Field(default_factory=RolloutCounts)
    pending_actions: list[OperatorAction] = Field(default_factory=list)
    # --- execution (v2) ---
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)
    phase: StagePhase = "window"
    bake_until: datetime | None = None
    first_issued_at: datetime | None = None
    stop_action: OperatorAction | None = None
    paused_by: str | None = None
    pause_note: str | None = None
    # Failures an operator accepted by resuming after FAILURE_THRESHOLD (not counted again).
    acknowledged_failed: int = 0
    # Stage whose unhealthy canary an operator passed with resume(force=True).
    canary_forced_stage: int | None = None
    last_total: GateCounts = Field(default_factory=GateCounts)
    # Rollback: the next stage (descending) to return; None before a rollback starts.
    rollback_next: int | None = None
    # Where the rollback of stage `rollback_next` is.
    rollback_phase: RollbackPhase = "issue"
    rollback_bake_until: datetime | None = None
    # The rollback's own gate counts (rollback_gate_counts) and the rollback failures an
    # operator accepted by resuming after a FAILURE_THRESHOLD pause of the rollback.
    rollback_total: GateCounts = Field(default_factory=GateCounts)
    rollback_acknowledged_failed: int = 0
    # statusReason of the stop: OPERATOR, or FAILURE_THRESHOLD for a gate's rollback.
    stop_reason: StatusReason = StatusReason.OPERATOR
    # The stage in progress (its phase above); equals len(stages) once all are done.
    current_stage: int = 0
    # Runs of this workflow so far (1 + continue-as-new count).
    runs: int = 1
    # --- judged by outcomes (v3) ---
    # Outcome signals received (the ingest path's coalesced "look again"), over every run.
    outcome_signals: int = 0
    # When the periodic gate tick (sweeps, then the gates) is next due.
    next_tick_at: datetime | None = None
    # Refused signals and Updates not yet audited (at most MAX_PENDING_REFUSALS; the ones
    # beyond are counted in refusals_dropped, which each refusal's audit entry carries).
    pending_refusals: list[ControlRefusal] = Field(default_factory=list)
    refusals_dropped: int = 0
    # The API markers accepted lately (each is accepted once; see ApiRequestMarker).
    api_claims: list[ApiMarkerClaim] = Field(default_factory=list)
    # Signals and Updates received so far (the last OperatorAction.seq given).
    control_seq: int = 0


class RolloutResult(BaseModel):
    rollout_id: int
    status: RolloutStatus
    status_reason: StatusReason | None = None
    stages_issued: int
    counts: RolloutCounts


# --- Activities ----------------------------------------------------------------------------


class ExpandTargetsInput(BaseModel):
    rollout_id: int


class ExpandTargetsResult(BaseModel):
    rollout_id: int
    release_version: str
    targeted: int
    stages: list[StagePlan]
    # True when this call inserted the targets, False when an earlier attempt had.
    inserted: bool
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)


class IssueStageInput(BaseModel):
    rollout_id: int
    release_version: str
    stage_index: int
    stage: str
    batch_size: int = ISSUE_BATCH_SIZE
    # Workflow time of the issue (the start of each vehicle's apply timeout); None: now().
    issued_at: datetime | None = None
    # The failure threshold is checked between batches (failures an operator acknowledged
    # by resuming after a FAILURE_THRESHOLD pause do not count).
    acknowledged_failed: int = 0


class IssueStageProgress(BaseModel):
    """Heartbeat details: where a retried attempt resumes."""

    last_vehicle_id: str = ""
    issued: int = 0
    batches: int = 0


class IssueStageResult(BaseModel):
    stage_index: int
    issued: int
    batches: int
    counts: RolloutCounts
    # Set when a breached failure threshold stopped issuing between batches (the stage's
    # remaining targets are still `planned`; issuing it again continues where it stopped).
    halted: GateDecision | None = None


class UpdateRolloutStatusInput(BaseModel):
    rollout_id: int
    status: RolloutStatus
    stage: str | None = None
    stage_index: int | None = None
    status_reason: StatusReason | None = None
    waiting_for: str | None = None
    # Audit entry written with the change (only when something changed).
    action: str
    actor: str = "workflow"
    source: AuditSource = AuditSource.SYSTEM
    reason: str | None = None
    correlation_id: str | None = None
    # An operator's action: which, and the API's marker when it came through the API. The
    # audit entry is skipped only when the marker proves that the API audited this request
    # (`services.rollouts.control.api_request_verified`, relative to `accepted_at`).
    control_action: ControlAction | None = None
    api_marker: ApiRequestMarker | None = None
    accepted_at: datetime | None = None


class UpdateRolloutStatusResult(BaseModel):
    changed: bool
    counts: RolloutCounts
    # The row's status after the write, when it is terminal and not the one asked for: the
    # write was refused (no transition out of a terminal status) and the workflow ends at
    # once. None otherwise (and in results recorded before it existed).
    finished_as: RolloutStatus | None = None
    finished_reason: str | None = None


class RecordControlRefusalsInput(BaseModel):
    """The refusals to audit (`rollout.{action}_refused`), and how many were dropped so far."""

    rollout_id: int
    refusals: list[ControlRefusal]
    dropped: int = 0


class RecordControlRefusalsResult(BaseModel):
    # Entries written (a refusal audited by an earlier attempt is not written again).
    recorded: int


class RollbackTargetsInput(BaseModel):
    rollout_id: int
    batch_size: int = ISSUE_BATCH_SIZE
    # One stage (a staged rollback, last stage first); None: every touched target.
    stage_index: int | None = None
    # When the rollback desired states go out (the rollback targets' notified_at).
    now: datetime | None = None


class RollbackTargetsResult(BaseModel):
    reverted: int
    skipped: int
    counts: RolloutCounts


class EvaluateGatesInput(BaseModel):
    rollout_id: int
    stage_index: int
    is_canary: bool
    bake_done: bool
    acknowledged_failed: int = 0
    canary_forced: bool = False
    # Gate the rollback: the rollback's own outcomes (rollback_gate_counts), no canary check.
    rollback: bool = False
    # The last stage: judged once the whole rollout has settled.
    is_last: bool = False
    # A look at new outcomes before the bake is over: the failure threshold from the
    # rollout's counters (one row); the stage is counted only once nothing is applying.
    quick: bool = False


class EvaluateGatesResult(BaseModel):
    total: GateCounts
    stage: GateCounts
    decision: GateDecision
    counts: RolloutCounts
    # The stage's settle: every vehicle issued in it has an outcome (`policy.unsettled`).
    settled: bool = True
    unsettled: int = 0
    # False for a quick look that did not count the stage (`stage` is then empty).
    stage_counted: bool = True


class TargetSweepInput(BaseModel):
    """Input of expire_apply_timeouts, retry_failed_targets and recheck_blocked: the settings
    come from the rollout row; `now` is the workflow's time (deterministic, time-skipping)."""

    rollout_id: int
    now: datetime


class TargetSweepResult(BaseModel):
    changed: int
    counts: RolloutCounts


# --- Reconcile: `ReconcileWorkflow` and its activities ---------------------------------------
# The schedule starts it with a cutoff age; it passes a cutoff, counts and a run key.


class ReconcileInput(BaseModel):
    """What the schedule starts `ReconcileWorkflow` with."""

    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    # Idempotency key of the run; default: the workflow id (distinct per schedule slot) and
    # the workflow's start time.
    run_key: str | None = None
    batch_size: int = OFFLINE_BATCH_SIZE
    # A pending rollout this old whose workflow does not exist is started.
    start_grace_seconds: int = DEFAULT_ROLLOUT_START_GRACE_SECONDS


class StartPendingInput(BaseModel):
    """The reconcile's start of `pending` rollouts created before `created_before`."""

    created_before: datetime
    batch_size: int = PENDING_START_BATCH_SIZE


class StartPendingProgress(BaseModel):
    """Heartbeat of the start pass: where a retried attempt resumes, what it did so far."""

    after_id: int = 0
    started: int = 0
    running: int = 0
    refused: int = 0


class StartPendingResult(BaseModel):
    pending: int = 0  # pending rollouts past the grace period looked at
    started: int = 0  # workflows started now (none existed)
    running: int = 0  # a workflow exists and runs (it writes `running` soon)
    refused: int = 0  # a closed workflow holds the id: marked failed (WORKFLOW_START_FAILED)


class MarkOfflineInput(BaseModel):
    cutoff: datetime
    batch_size: int = OFFLINE_BATCH_SIZE


class MarkOfflineProgress(BaseModel):
    """Heartbeat details of `mark_offline_vehicles`: where a retried attempt resumes."""

    after_key: datetime | None = None
    after_id: str | None = None
    marked: int = 0
    batches: int = 0


class MarkOfflineResult(BaseModel):
    marked: int
    batches: int


class RecordDriftInput(BaseModel):
    run_key: str
    marked_offline: int = 0
    cutoff: datetime | None = None
    # What the run's other steps changed (its audit entry is written only when the run
    # changed something): blocked vehicles notified, pending rollouts started or refused.
    rechecked: int = 0
    started_rollouts: int = 0
    refused_rollouts: int = 0


class RecordDriftResult(BaseModel):
    run_id: int
    run_key: str
    drifted: int
    groups: int
    created: bool


class RecheckCompletedInput(BaseModel):
    """The reconcile's safety pass (`recheck_completed_rollouts`): the blocked vehicles of
    completed rollouts are notified once a heartbeat passes their rollout's checks."""

    # The workflow's time: whether each rollout's maintenance window is open, and the
    # `notified_at` of the targets notified.
    now: datetime
    # How old a heartbeat the checks still trust (the reconcile's offline cutoff age).
    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    batch_size: int = SWEEP_BATCH_SIZE


class RecheckCompletedResult(BaseModel):
    # Completed rollouts with blocked targets, and those of them left alone because their
    # maintenance window is closed.
    rollouts: int = 0
    outside_window: int = 0
    # Targets moved: notified, their reason code changed, or skipped (superseded).
    changed: int = 0


class ReconcileResult(BaseModel):
    run_id: int
    run_key: str
    marked_offline: int
    drifted: int


# --- Retention (workflows/retention.py, activities/retention.py) ---------------------------

RETENTION_BATCH_SIZE = 5000


class RetentionInput(BaseModel):
    """What the schedule starts `RetentionWorkflow` with: how long each kind of row is kept
    (0 days: forever; the change feed is always purged)."""

    change_feed_hours: int = 24
    timeline_days: int = 90
    audit_days: int = 0
    batch_size: int = RETENTION_BATCH_SIZE
    # At most this many batches per activity and run: a backlog is worked off over the next
    # runs, and no attempt runs for hours.
    max_batches: int = 200


class PurgeInput(BaseModel):
    cutoff: datetime
    batch_size: int = RETENTION_BATCH_SIZE
    max_batches: int = 200


class PurgeProgress(BaseModel):
    """Heartbeat details of a purge: where a retried attempt resumes (`partition`: the
    timeline's, by index) and what it deleted so far."""

    partition: int = 0
    deleted: int = 0
    batches: int = 0


class PurgeResult(BaseModel):
    deleted: int = 0
    batches: int = 0
    done: bool = True  # False: stopped at max_batches with rows still past retention


class RetentionResult(BaseModel):
    change_feed: PurgeResult
    timeline: PurgeResult | None = None  # None: kept forever (0 days)
    audit: PurgeResult | None = None


RolloutInput.model_rebuild()
