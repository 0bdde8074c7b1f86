"""Payloads of the reconcile workflow and its activities, and the report schemas of
`GET /api/v1/reports/reconcile` and `GET /api/v1/reports/health` (camelCase on the wire).

Nothing here carries a vehicle list: the workflow passes a cutoff, counts and a run key."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

# --- Workflow and activities ---------------------------------------------------------------


class ReconcileInput(BaseModel):
    """What the schedule starts `ReconcileWorkflow` with."""

    offline_after_seconds: int = 300
    # Idempotency key of the run; default: the workflow id (distinct per schedule slot) and
    # the workflow's start time.
    run_key: str | None = None
    batch_size: int = 10_000


class MarkOfflineInput(BaseModel):
    cutoff: datetime
    batch_size: int = 10_000


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


class RecordDriftResult(BaseModel):
    run_id: int
    run_key: str
    drifted: int
    groups: int
    created: bool


class ReconcileResult(BaseModel):
    run_id: int
    run_key: str
    marked_offline: int
    drifted: int


# --- API reports ---------------------------------------------------------------------------


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class ReconcileRunOut(_Camel):
    id: int
    run_key: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # Fleet-wide; null for a scoped caller (the offline marking is not recorded per place).
    marked_offline: int | None = None
    # Vehicles whose desired release differs from the actual one, inside the caller's scope.
    drifted: int


class DriftRowOut(_Camel):
    desired_release_version: str | None
    actual_release_version: str | None
    status: str
    region: str
    model: str
    org: str
    vehicles: int


class ReconcileReport(_Camel):
    latest: ReconcileRunOut | None
    drift: list[DriftRowOut]
    drift_truncated: bool = False
    recent_runs: list[ReconcileRunOut]


class ReasonCodeCount(_Camel):
    reason_code: str
    vehicles: int


class HealthReport(_Camel):
    total: int
    by_status: dict[str, int]
    offline: int
    top_reason_codes: list[ReasonCodeCount]


class PlaceCounts(_Camel):
    total: int
    by_status: dict[str, int]


class FleetSummary(_Camel):
    """`GET /fleet/summary`: counts inside the caller's scope as of `asOf` (the materialization
    each reconcile run refreshes; null before the first run)."""

    as_of: datetime | None = None
    total: int
    by_status: dict[str, int]
    by_model: dict[str, PlaceCounts]
    by_region: dict[str, PlaceCounts]
    by_ring: dict[str, PlaceCounts]
    top_reason_codes: list[ReasonCodeCount]
