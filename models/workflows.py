"""Workflow, activity, signal and update payloads. Nothing here carries a vehicle list:
workflows pass ids, counts, stage numbers and cursors; vehicles stay in PostgreSQL."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RolloutInput(BaseModel):
    """What starts `RolloutWorkflow`: the rollout row is the source of truth for the rest."""

    rollout_id: int
    release_version: str
    correlation_id: str | None = None


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

    `source` defaults to `temporal` (a signal from the CLI or the Web UI, audited by the
    workflow); the API sends `source="api"` because it has already audited the request.
    """

    reason: str | None = None
    actor: str | None = None
    source: str | None = None
    correlation_id: str | None = Field(default=None, alias="correlationId")

    model_config = ConfigDict(populate_by_name=True)


# --- Workflow state and result -------------------------------------------------------------


class ControlRequest(BaseModel):
    """Input of the `control` Update, the API's way to steer a running rollout. Its validator
    refuses an invalid transition at once (resume of a rollout that is not paused, anything
    on a finished one); the API answers that with 409 INVALID_STATE_TRANSITION. The API has
    audited the request itself, so `source="api"` tells the workflow not to audit it again."""

    action: Literal["pause", "resume", "rollback", "abort"]
    reason: str
    actor: str | None = None
    source: str = "api"
    correlation_id: str | None = None


class ControlResult(BaseModel):
    """What the `control` Update answers: the rollout's status once the action is accepted."""

    action: str
    status: str
    paused: bool


class OperatorAction(BaseModel):
    """A signal received and not yet persisted (audited and written to the rollout row)."""

    action: str  # pause | resume | abort | rollback
    reason: str | None = None
    actor: str | None = None
    source: str = "temporal"
    correlation_id: str | None = None


class RolloutState(BaseModel):
    """Everything the workflow knows; what `progress` answers and continue-as-new would carry."""

    rollout_id: int
    release_version: str
    correlation_id: str | None = None
    status: str = "pending"
    status_reason: str | None = None
    stage: str | None = None
    stage_index: int = 0
    stage_count: int = 0
    stages: list[StagePlan] = Field(default_factory=list)
    # Index of the next stage to issue (stages before it are issued and baked).
    next_stage: int = 0
    expanded: bool = False
    paused: bool = False
    stop_requested: str | None = None  # "abort" | "rollback"
    waiting_for: str | None = None
    counts: RolloutCounts = Field(default_factory=RolloutCounts)
    pending_actions: list[OperatorAction] = Field(default_factory=list)


class RolloutResult(BaseModel):
    rollout_id: int
    status: str
    status_reason: str | None = None
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


class IssueStageInput(BaseModel):
    rollout_id: int
    release_version: str
    stage_index: int
    stage: str
    batch_size: int = 1000


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


class UpdateRolloutStatusInput(BaseModel):
    rollout_id: int
    status: str
    stage: str | None = None
    stage_index: int | None = None
    status_reason: str | None = None
    waiting_for: str | None = None
    # Audit entry written with the change (only when something changed).
    action: str
    actor: str = "workflow"
    source: str = "system"
    reason: str | None = None
    correlation_id: str | None = None
    # False when the API already audited the operator's request (signal with source "api").
    audit: bool = True


class UpdateRolloutStatusResult(BaseModel):
    changed: bool
    counts: RolloutCounts


class RollbackTargetsInput(BaseModel):
    rollout_id: int
    batch_size: int = 1000


class RollbackTargetsResult(BaseModel):
    reverted: int
    skipped: int
    counts: RolloutCounts
