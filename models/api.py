"""API schemas: camelCase on the wire (SPEC.md), snake_case in Python."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from models.defaults import (
    DEFAULT_APPLY_SECONDS,
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_FAILURE_ACTION,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_MIN_SUCCESS_RATE,
    FailureAction,
)
from models.enums import WEEKDAYS, Role, RolloutStatus, VehicleStatus, Weekday
from models.storable import check_storable_json
from models.workflows import RolloutCounts

T = TypeVar("T")


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


# `model_validate(..., context={STORED: True})`: data read back from PostgreSQL, which took
# it, so the per-string storable check (a walk of every string: 17 ms for 10,000 vehicle ids)
# is skipped.
STORED = "stored"


class StrictCamelModel(CamelModel):
    """Request bodies: unknown fields are refused, so a typo never goes unnoticed, and every
    string in every field (inside lists, `metadata` and other JSON objects, keys included)
    is one PostgreSQL can store (`models.storable`): U+0000 or a lone surrogate is a 422 naming
    the field, never a failed statement."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        if info.context and info.context.get(STORED):  # read back: it was checked on the way in
            return value
        return check_storable_json(value)


ZONED_TIME = "an ISO-8601 time with a zone, for example 2026-11-28T10:00:00Z"


def _zoned_time(value: Any) -> Any:
    """Only an ISO-8601 text with a zone (pydantic alone would take `0.5` or `1700000000` as
    Unix time, and a time without a zone as local)."""
    if isinstance(value, datetime):
        at = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(ZONED_TIME) from None
    else:
        raise ValueError(ZONED_TIME)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(ZONED_TIME)
    return at


ZonedDateTime = Annotated[datetime, BeforeValidator(_zoned_time)]
"""A time a client sends (a query parameter, a body field): ISO-8601 with a zone, nothing
else."""


# Envelopes ---------------------------------------------------------------------------------


class ListMetadata(CamelModel):
    request_id: str | None = None
    limit: int
    next_cursor: str | None = None
    has_more: bool


class ItemMetadata(CamelModel):
    request_id: str | None = None


class Envelope(CamelModel, Generic[T]):
    data: T
    metadata: ItemMetadata
    timestamp: datetime


class ListEnvelope(CamelModel, Generic[T]):
    data: list[T]
    metadata: ListMetadata
    timestamp: datetime


class ErrorDetail(CamelModel):
    field: str | None = None
    index: int | None = None
    message: str
    code: str | None = None


class ErrorBody(CamelModel):
    code: str
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class HealthOut(CamelModel):
    status: Literal["ok"] = Field(description="The process answers.")


class ReadinessChecks(CamelModel):
    database: Literal["ok", "unavailable"] = Field(
        description="PostgreSQL answered within 3 s, on a connection of the probe's own."
    )
    temporal: Literal["ok", "unavailable"] | None = Field(
        None, description="Temporal answered within 3 s (absent on an ingest process)."
    )
    pool: Literal["ok", "exhausted"] = Field(
        description="Whether the request pool has a connection to lend; reported, not judged."
    )


class ReadinessOut(CamelModel):
    status: Literal["ok", "unavailable"] = Field(
        description="`ok` (200) when every dependency answered, else `unavailable` (503)."
    )
    checks: ReadinessChecks


class StreamTicketOut(CamelModel):
    ticket: str = Field(description="Pass as `GET /api/v1/stream?ticket=...`.")
    expires_at: datetime = Field(description="When it stops opening streams (and ends them).")


class CallerOut(CamelModel):
    """`GET /me`: the caller as the API sees its token."""

    subject: str = Field(description="The token's `sub` claim.", examples=["alice@example.com"])
    role: Role = Field(description="The token's role: what the API lets it do.")
    can_write: bool = Field(
        description="True for a role that may write (create and control rollouts, register "
        "releases and vehicles): the dashboard's operator controls."
    )
    regions: list[str] | None = Field(
        None, description="The regions the caller may see; null: every region."
    )
    models: list[str] | None = Field(
        None, description="The vehicle models the caller may see; null: every model."
    )
    orgs: list[str] | None = Field(
        None, description="The organisations the caller may see; null: every organisation."
    )
    vehicle_id: str | None = Field(None, description="A device token's vehicle; else null.")
    expires_at: datetime | None = Field(
        None, description="When the token expires (its `exp`); sign in again before then."
    )


class ErrorEnvelope(CamelModel):
    error: ErrorBody
    metadata: ItemMetadata
    timestamp: datetime


# Vehicles ----------------------------------------------------------------------------------


class VehicleDesired(CamelModel):
    release_version: str | None = None
    desired_state_id: str | None = None
    rollout_id: int | None = None


class VehicleActual(CamelModel):
    release_version: str | None = None


class VehicleOut(CamelModel):
    id: str
    model: str
    region: str
    ring: str
    org: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    desired: VehicleDesired
    actual: VehicleActual
    status: VehicleStatus
    reason_codes: list[str] = Field(default_factory=list)
    last_seen_at: datetime | None = None
    battery_percent: int | None = None
    stationary: bool | None = None
    updated_at: datetime | None = None


VEHICLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$"
MAX_VEHICLES_PER_REGISTRATION = 500


class VehicleIn(StrictCamelModel):
    """A vehicle to register: where it sits in the fleet (what scopes and rollouts select)."""

    id: str = Field(min_length=1, max_length=128, pattern=VEHICLE_ID_PATTERN)
    model: str = Field(min_length=1, max_length=64)
    region: str = Field(min_length=1, max_length=64)
    ring: str = Field(min_length=1, max_length=64)
    org: str = Field("default", min_length=1, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)


class VehicleBatchIn(StrictCamelModel):
    vehicles: list[VehicleIn] = Field(min_length=1, max_length=MAX_VEHICLES_PER_REGISTRATION)


# Releases ----------------------------------------------------------------------------------


class ReleaseComponent(CamelModel):
    name: str
    version: str


class ReleaseComponentIn(StrictCamelModel):
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)


class ReleaseCreate(StrictCamelModel):
    """A release as the build pipeline signed it: ed25519 over the canonical form of
    `version`, `artifactDigest` and `components` (docs/releases.md)."""

    version: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    components: list[ReleaseComponentIn] = Field(min_length=1, max_length=200)
    artifact_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    signature: str = Field(min_length=1, max_length=256, description="base64 ed25519 signature")
    signing_key_id: str = Field(min_length=1, max_length=128)
    notes: str | None = Field(None, max_length=4000)


class ReleaseOut(CamelModel):
    version: str
    components: list[ReleaseComponent]
    artifact_digest: str
    signature: str
    signing_key_id: str
    notes: str | None = None
    created_by: str
    created_at: datetime | None = None


# Rollouts ----------------------------------------------------------------------------------


class RolloutTargets(StrictCamelModel):
    models: list[str] = Field(default_factory=list, max_length=100)
    regions: list[str] = Field(default_factory=list, max_length=100)
    rings: list[str] = Field(default_factory=list, max_length=100)
    orgs: list[str] = Field(default_factory=list, max_length=100)
    vehicle_ids: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _something(self) -> RolloutTargets:
        if not (self.models or self.regions or self.rings or self.orgs or self.vehicle_ids):
            raise ValueError("select at least one of models, regions, rings, orgs or vehicleIds")
        return self


class CanarySpec(StrictCamelModel):
    size: int | None = Field(None, ge=1, le=1_000_000)
    percent: float | None = Field(None, gt=0, le=100)
    bake_seconds: int = Field(3600, ge=0, le=30 * 86400)

    @model_validator(mode="after")
    def _one_of(self) -> CanarySpec:
        if (self.size is None) == (self.percent is None):
            raise ValueError("give exactly one of size or percent")
        return self


class WaveSpec(StrictCamelModel):
    percent: float = Field(gt=0, le=100)
    bake_seconds: int = Field(3600, ge=0, le=30 * 86400)


class Strategy(StrictCamelModel):
    canary: CanarySpec
    waves: list[WaveSpec] = Field(min_length=1, max_length=50)

    @field_validator("waves")
    @classmethod
    def _cumulative(cls, waves: list[WaveSpec]) -> list[WaveSpec]:
        previous = 0.0
        for wave in waves:
            if wave.percent <= previous:
                raise ValueError("wave percents are cumulative and must increase")
            previous = wave.percent
        if waves[-1].percent != 100:
            raise ValueError("the last wave must reach 100 percent")
        return waves


class CanaryHealthyGate(StrictCamelModel):
    min_success_rate: float = Field(DEFAULT_MIN_SUCCESS_RATE, ge=0, le=1)
    min_samples: int = Field(DEFAULT_MIN_SAMPLES, ge=0)


class FailureThresholdGate(StrictCamelModel):
    max_failure_rate: float = Field(DEFAULT_MAX_FAILURE_RATE, ge=0, le=1)
    action: FailureAction = DEFAULT_FAILURE_ACTION


class MaintenanceWindow(StrictCamelModel):
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", examples=["01:00"])
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", examples=["05:00"])
    timezone: str = "UTC"
    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value


class SafetyChecks(StrictCamelModel):
    require_stationary: bool | None = None
    min_battery_percent: int | None = Field(None, ge=0, le=100)
    maintenance_window: MaintenanceWindow | None = None


class Gates(StrictCamelModel):
    canary_healthy: CanaryHealthyGate = Field(default_factory=CanaryHealthyGate)
    failure_threshold: FailureThresholdGate = Field(default_factory=FailureThresholdGate)
    safety_checks: SafetyChecks = Field(default_factory=SafetyChecks)


class Timeouts(StrictCamelModel):
    apply_seconds: int = Field(DEFAULT_APPLY_SECONDS, ge=60, le=7 * 86400)


class RetryPolicy(StrictCamelModel):
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=10)
    backoff_seconds: int = Field(DEFAULT_BACKOFF_SECONDS, ge=0, le=86400)


class RolloutCreate(StrictCamelModel):
    name: str | None = Field(None, max_length=200)
    release_version: str = Field(min_length=1, max_length=128)
    targets: RolloutTargets
    strategy: Strategy
    gates: Gates = Field(default_factory=Gates)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    acknowledge_weakened_safety: bool = False
    reason: str | None = Field(None, max_length=2000)


class RolloutOut(CamelModel):
    id: int
    name: str | None = None
    release_version: str
    status: RolloutStatus
    status_reason: str | None = None
    stage: str | None = None
    stage_index: int = 0
    stage_count: int = 0
    waiting_for: str | None = None
    # As created (the same types as RolloutCreate's, defaults filled in).
    targets: RolloutTargets
    strategy: Strategy
    gates: Gates
    timeouts: Timeouts
    retry: RetryPolicy
    progress: RolloutCounts
    stages: list[PlannedStage] = Field(
        default_factory=list,
        description="The stages in order, each with its share of the targeted vehicles "
        "(cumulative in rank order: a stage's vehicles follow the previous stages'). Planned "
        "from `progress.targeted` and `strategy`, so empty until the targets are expanded. "
        "Not carried by `rollout.updated`: read the rollout again when `stageCount` or "
        "`progress.targeted` changes.",
    )
    workflow_id: str | None = None
    temporal_ui_url: str | None = None
    created_by: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class PlannedStage(CamelModel):
    index: int
    name: str
    vehicles: int
    bake_seconds: int


class SafetyNow(CamelModel):
    """How many targeted vehicles the safety checks would block right now (vehicles columns)."""

    require_stationary: bool
    min_battery_percent: int
    blocked: int = Field(description="Vehicles failing at least one check now.")
    battery_low: int
    not_stationary: int
    unknown: int = Field(description="Vehicles with no battery or stationary report yet.")
    offline: int


class Overlap(CamelModel):
    """Targeted vehicles already inside another active rollout."""

    vehicles: int = Field(0, description="How many of the targeted vehicles are held.")
    sample_vehicle_ids: list[str] = Field(default_factory=list)
    rollout_ids: list[int] = Field(
        default_factory=list,
        description="The holding rollouts the caller can see: one outside a scoped caller's"
        " scope is neither named nor counted.",
    )


class RolloutPlanOut(CamelModel):
    """`POST /rollouts?dryRun=true`: what creating the rollout would do now; nothing stored."""

    release_version: str
    targeted: int
    stages: list[PlannedStage]
    safety: SafetyNow
    weakened_safety: list[str] = Field(default_factory=list)
    maintenance_window: MaintenanceWindow | None = None
    overlap: Overlap
    can_start: bool = Field(description="False when creating it now would be refused.")
    problems: list[str] = Field(default_factory=list)


class ControlBody(StrictCamelModel):
    reason: str = Field(min_length=1, max_length=2000, description="Why (required, audited).")
    force: bool = Field(
        False,
        description="`resume` only: continue past a canary that is still unhealthy "
        "(the operator takes responsibility; audited).",
    )

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a reason")
        return value.strip()


class ControlOutcome(CamelModel):
    action: str
    status: str
    paused: bool


class RolloutControlOut(CamelModel):
    """The rollout as PostgreSQL has it now, and what the workflow answered."""

    rollout: RolloutOut
    control: ControlOutcome


class RolloutVehicleOut(CamelModel):
    vehicle_id: str
    stage: str
    stage_index: int
    state: str
    attempt: int
    reason_code: str | None = None
    desired_state_id: str | None = None
    notified_at: datetime | None = None
    updated_at: datetime | None = None
    model: str
    region: str
    ring: str
    vehicle_status: str


# Desired states ----------------------------------------------------------------------------


class DesiredStateCreate(StrictCamelModel):
    release_version: str = Field(min_length=1, max_length=128)
    targets: RolloutTargets
    safety_checks: SafetyChecks = Field(default_factory=SafetyChecks)
    acknowledge_weakened_safety: bool = False
    reason: str | None = Field(None, max_length=2000)


class AuditEntryOut(CamelModel):
    """One audit entry (SPEC.md, Audit); secrets in `payload` are redacted when written."""

    id: int
    at: datetime | None = None
    actor: str
    role: str | None = None
    source: str = Field(description="`api`, `temporal` or `system`.")
    action: str
    target_type: str
    target_id: str | None = None
    reason: str | None = None
    correlation_id: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    result: str


class DesiredStateConstraints(CamelModel):
    """The safety checks a desired state was issued under: the vehicle checks them again at
    apply time and reports `blocked` (with `BATTERY_LOW`, `NOT_STATIONARY` or
    `OUTSIDE_MAINTENANCE_WINDOW`) when one fails."""

    min_battery_percent: int = Field(description="Apply only with at least this battery.")
    require_stationary: bool = Field(description="Apply only while parked.")
    maintenance_window: MaintenanceWindow | None = Field(
        None, description="Apply only inside this window (null: at any time)."
    )

    @classmethod
    def stored(cls, value: dict[str, Any] | None) -> DesiredStateConstraints | None:
        """A desired state's `constraints` column (camelCase JSON; NULL for old rows)."""
        return cls.model_validate(value) if value else None


class DesiredStateOut(CamelModel):
    id: str
    vehicle_id: str | None = Field(
        None,
        description="The vehicle it is for; null for a target set's desired state (a rollout's"
        " stage, retry attempt or rollback), which every vehicle of the set points to.",
    )
    release_version: str
    rollout_id: int | None = None
    previous_desired_state_id: str | None = None
    reason: str | None = None
    created_by: str
    created_at: datetime | None = None
    constraints: DesiredStateConstraints | None = Field(
        None, description="Null for a direct desired state written before constraints existed."
    )


class IssuedDesiredState(CamelModel):
    vehicle_id: str
    desired_state_id: str


class DesiredStatesCreated(CamelModel):
    release_version: str
    count: int
    sample: list[IssuedDesiredState] = Field(
        default_factory=list, description="Up to 10 of the desired states written."
    )
    safety_checks: dict[str, Any]


class Health(CamelModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
