"""The data model: SQLModel tables. The schema itself ships as Alembic migrations
(`migrations/versions/`), never `create_all`; a test compares the two.

Scale notes (see docs/data-model.md): every list filter has an index that ends in the keyset
column; timeline events are hash-partitioned by vehicle; counters replace scans.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlmodel import Field, SQLModel

TIMEZONE = DateTime(timezone=True)
LAST_SEEN_KEY_SQL = "coalesce(last_seen_at, '1970-01-01 00:00:00+00'::timestamptz)"


def _now_column(**kw: Any) -> Any:
    return Field(sa_column=Column(TIMEZONE, nullable=False, server_default=func.now(), **kw))


def _json_column(default: str = "'{}'::jsonb", nullable: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=Column(JSONB, nullable=nullable, server_default=text(default)),
    )


class Vehicle(SQLModel, table=True):
    __tablename__ = "vehicles"
    __table_args__ = (
        Index("ix_vehicles_model_id", "model", "id"),
        Index("ix_vehicles_region_id", "region", "id"),
        Index("ix_vehicles_ring_id", "ring", "id"),
        Index("ix_vehicles_org_id", "org", "id"),
        Index("ix_vehicles_actual_release_id", "actual_release_version", "id"),
        Index("ix_vehicles_last_seen_id", "last_seen_key", "id"),
        Index("ix_vehicles_reason_codes", "reason_codes", postgresql_using="gin"),
        Index("ix_vehicles_id_pattern", "id", postgresql_ops={"id": "text_pattern_ops"}),
        # Room on each page for heap-only (HOT) updates: issuing a desired state changes only
        # unindexed columns (status, desired release, rollout id), so it writes no index entry.
        {"postgresql_with": {"fillfactor": "70"}},
    )

    id: str = Field(sa_column=Column(Text, primary_key=True))
    model: str = Field(sa_column=Column(Text, nullable=False))
    region: str = Field(sa_column=Column(Text, nullable=False))
    ring: str = Field(sa_column=Column(Text, nullable=False))
    org: str = Field(
        default="default", sa_column=Column(Text, nullable=False, server_default="default")
    )
    metadata_: dict[str, Any] | None = Field(
        default=None,
        sa_column=Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    )
    desired_release_version: str | None = Field(default=None, sa_column=Column(Text))
    desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    rollout_id: int | None = Field(default=None, sa_column=Column(BigInteger))
    actual_release_version: str | None = Field(default=None, sa_column=Column(Text))
    status: str = Field(
        default="pending", sa_column=Column(Text, nullable=False, server_default="pending")
    )
    reason_codes: list[str] | None = Field(
        default=None,
        sa_column=Column(ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    )
    last_seen_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    # last_seen_at with NULL as the epoch: a total order for keyset pagination on lastSeenAt.
    last_seen_key: datetime | None = Field(
        default=None,
        sa_column=Column(
            TIMEZONE,
            Computed(
                "coalesce(last_seen_at, '1970-01-01 00:00:00+00'::timestamptz)", persisted=True
            ),
            nullable=False,
        ),
    )
    battery_percent: int | None = Field(default=None, sa_column=Column(SmallInteger))
    stationary: bool | None = Field(default=None)
    # The latest event (by seq) and what it said (migration 0008): unindexed, so the rewrite
    # that an event moving the status makes is a heap-only update.
    last_event_seq: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    # Its epoch (migration 0013): the newest event is the greatest (epoch, seq).
    last_event_epoch: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    last_event_type: str | None = Field(default=None, sa_column=Column(Text))
    last_event_desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    last_event_release_version: str | None = Field(default=None, sa_column=Column(Text))
    last_event_reason_code: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime | None = _now_column()
    updated_at: datetime | None = _now_column()


class VehicleTelemetry(SQLModel, table=True):
    """The narrow, hot per-vehicle row written by heartbeats (docs/data-model.md): no
    secondary index and fillfactor 50, so a heartbeat is a HOT update here and the wide
    `vehicles` row is only rewritten when something visible changes. (Migration 0008 moved
    the latest event to the `vehicles` row and the fillfactor from 70 to 50.)"""

    __tablename__ = "vehicle_telemetry"
    __table_args__ = ({"postgresql_with": {"fillfactor": "50"}},)

    vehicle_id: str = Field(sa_column=Column(Text, primary_key=True))
    # The server's receive time of the latest heartbeat (liveness, migration 0013).
    last_seen_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    # What orders the values below: the `sentAt` of the heartbeat that wrote them, capped at
    # its arrival (services/telemetry/clock.py).
    heartbeat_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    battery_percent: int | None = Field(default=None, sa_column=Column(SmallInteger))
    stationary: bool | None = Field(default=None)
    actual_release_version: str | None = Field(default=None, sa_column=Column(Text))


class Release(SQLModel, table=True):
    __tablename__ = "releases"
    __table_args__ = (Index("ix_releases_created", "created_at", "version"),)

    version: str = Field(sa_column=Column(Text, primary_key=True))
    components: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    )
    artifact_digest: str = Field(sa_column=Column(Text, nullable=False))
    signature: str = Field(sa_column=Column(Text, nullable=False))
    signing_key_id: str = Field(sa_column=Column(Text, nullable=False))
    notes: str | None = Field(default=None, sa_column=Column(Text))
    created_by: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime | None = _now_column()


class DesiredState(SQLModel, table=True):
    """A desired release for one vehicle (`vehicle_id` set: the API's direct desired states) or
    for a target set (`vehicle_id` NULL: a rollout's stage, retry attempt or rollback, which
    every vehicle of the set points to through `vehicles.desired_state_id`)."""

    __tablename__ = "desired_states"
    __table_args__ = (
        Index("ix_desired_states_vehicle_created", "vehicle_id", "created_at", "id"),
        Index("ix_desired_states_rollout", "rollout_id", "vehicle_id"),
        Index("ix_desired_states_created", "created_at", "id"),
    )

    id: uuid.UUID = Field(sa_column=Column(UUID, primary_key=True))
    vehicle_id: str | None = Field(default=None, sa_column=Column(Text))
    release_version: str = Field(sa_column=Column(Text, nullable=False))
    rollout_id: int | None = Field(default=None, sa_column=Column(BigInteger))
    previous_desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    created_by: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime | None = _now_column()
    # The safety checks the vehicle applies again at apply time (migration 0012):
    # {"minBatteryPercent", "requireStationary", "maintenanceWindow"}; NULL for a direct
    # desired state written before them.
    constraints: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB))


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"
    __table_args__ = (
        Index("ix_rollouts_status_id", "status", "id"),
        Index("ix_rollouts_release_id", "release_version", "id"),
        Index("ix_rollouts_created", "created_at", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger, Identity(start=1), primary_key=True)
    )
    name: str | None = Field(default=None, sa_column=Column(Text))
    release_version: str = Field(sa_column=Column(Text, nullable=False))
    targets: dict[str, Any] | None = _json_column()
    strategy: dict[str, Any] | None = _json_column()
    gates: dict[str, Any] | None = _json_column()
    timeouts: dict[str, Any] | None = _json_column()
    retry: dict[str, Any] | None = _json_column()
    status: str = Field(
        default="pending", sa_column=Column(Text, nullable=False, server_default="pending")
    )
    status_reason: str | None = Field(default=None, sa_column=Column(Text))
    stage: str | None = Field(default=None, sa_column=Column(Text))
    stage_index: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    stage_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    workflow_id: str | None = Field(default=None, sa_column=Column(Text))
    waiting_for: str | None = Field(default=None, sa_column=Column(Text))
    # Progress counters, kept current by the workflow's activities (never a scan per request).
    targeted: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    notified: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    updating: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    succeeded: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    failed: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    blocked: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    pending: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    # Targets notified again by the blocked re-check and not done yet (`notified` or
    # `updating` with rollout_targets.rechecked, migration 0017): the gates' quick look leaves
    # them out of what is still applying.
    rechecked: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    safety_acknowledgement: dict[str, Any] | None = _json_column("null", nullable=True)
    correlation_id: str | None = Field(default=None, sa_column=Column(Text))
    created_by: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime | None = _now_column()
    updated_at: datetime | None = _now_column()
    started_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    finished_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))


class RolloutTarget(SQLModel, table=True):
    """One vehicle inside one rollout: its stage, attempt and state."""

    __tablename__ = "rollout_targets"
    __table_args__ = (
        PrimaryKeyConstraint("rollout_id", "vehicle_id"),
        # One index, without `state`: issuing (planned -> notified) is a HOT update.
        Index("ix_rollout_targets_stage", "rollout_id", "stage", "vehicle_id"),
        {"postgresql_with": {"fillfactor": "70"}},
    )

    rollout_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    vehicle_id: str = Field(sa_column=Column(Text, nullable=False))
    stage: int = Field(sa_column=Column(SmallInteger, nullable=False))
    # Deterministic position inside the rollout (hash of rollout and vehicle), for planning.
    rank: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(
        default="planned", sa_column=Column(Text, nullable=False, server_default="planned")
    )
    attempt: int = Field(
        default=0, sa_column=Column(SmallInteger, nullable=False, server_default="0")
    )
    reason_code: str | None = Field(default=None, sa_column=Column(Text))
    desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    previous_desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    previous_release_version: str | None = Field(default=None, sa_column=Column(Text))
    notified_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    # Notified again by the blocked re-check (migration 0017): while `notified` or `updating`,
    # the stage's settle does not wait for it (workflows/policy.py, `unsettled`).
    rechecked: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    updated_at: datetime | None = _now_column()


class TimelineEvent(SQLModel, table=True):
    """Vehicle timeline events. Hash-partitioned by vehicle_id (16 partitions, created by the
    migration): the primary key (vehicle_id, event_id) deduplicates and includes the partition
    key, and a vehicle's timeline is read from a single partition."""

    __tablename__ = "timeline_events"
    __table_args__ = (
        PrimaryKeyConstraint("vehicle_id", "event_id"),
        Index("ix_timeline_vehicle_epoch_seq", "vehicle_id", "epoch", "seq"),
        Index("ix_timeline_received", "received_at"),  # retention (migration 0016)
        {"postgresql_partition_by": "HASH (vehicle_id)"},
    )

    vehicle_id: str = Field(sa_column=Column(Text, nullable=False))
    event_id: uuid.UUID = Field(sa_column=Column(UUID, nullable=False))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    # The device's counter generation (migration 0013): a timeline is ordered by (epoch, seq).
    epoch: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    type: str = Field(sa_column=Column(Text, nullable=False))
    occurred_at: datetime = Field(sa_column=Column(TIMEZONE, nullable=False))
    received_at: datetime | None = _now_column()
    desired_state_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID))
    release_version: str | None = Field(default=None, sa_column=Column(Text))
    reason_code: str | None = Field(default=None, sa_column=Column(Text))
    details: dict[str, Any] | None = _json_column()


class AuditEntry(SQLModel, table=True):
    """Append-only: a trigger refuses UPDATE, and DELETE except inside the retention purge's
    transaction (migration 0007)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_at", "at", "id"),
        Index("ix_audit_actor_at", "actor", "at", "id"),
        Index("ix_audit_action_at", "action", "at", "id"),
        Index("ix_audit_target_at", "target_type", "target_id", "at", "id"),
        Index("ix_audit_correlation", "correlation_id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger, Identity(start=1), primary_key=True)
    )
    at: datetime | None = _now_column()
    actor: str = Field(sa_column=Column(Text, nullable=False))
    role: str | None = Field(default=None, sa_column=Column(Text))
    source: str = Field(sa_column=Column(Text, nullable=False))
    action: str = Field(sa_column=Column(Text, nullable=False))
    target_type: str = Field(sa_column=Column(Text, nullable=False))
    target_id: str | None = Field(default=None, sa_column=Column(Text))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    correlation_id: str | None = Field(default=None, sa_column=Column(Text))
    payload: dict[str, Any] | None = _json_column()
    result: str = Field(sa_column=Column(Text, nullable=False))
    # Scope of the target, so scoped callers see only their entries.
    regions: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text)))
    models: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text)))
    orgs: list[str] | None = Field(default=None, sa_column=Column(ARRAY(Text)))


class ChangeFeed(SQLModel, table=True):
    """The SSE change feed: written in the same transaction as the change it describes.
    Read by id (the primary key); retention by time (BRIN). No other index: every writer
    appends, and each B-tree would be one more contended right-hand edge (migration 0005)."""

    __tablename__ = "change_feed"
    __table_args__ = (Index("ix_change_feed_created", "created_at", postgresql_using="brin"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger, Identity(start=1), primary_key=True)
    )
    topic: str = Field(sa_column=Column(Text, nullable=False))
    event: str = Field(sa_column=Column(Text, nullable=False))
    entity_id: str | None = Field(default=None, sa_column=Column(Text))
    payload: dict[str, Any] | None = _json_column()
    region: str | None = Field(default=None, sa_column=Column(Text))
    model: str | None = Field(default=None, sa_column=Column(Text))
    org: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime | None = _now_column()


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_keys"
    __table_args__ = (
        PrimaryKeyConstraint("caller", "key"),
        Index("ix_idempotency_expires", "expires_at"),
    )

    caller: str = Field(sa_column=Column(Text, nullable=False))
    key: str = Field(sa_column=Column(Text, nullable=False))
    method: str = Field(sa_column=Column(Text, nullable=False))
    path: str = Field(sa_column=Column(Text, nullable=False))
    request_hash: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(
        default="in_flight", sa_column=Column(Text, nullable=False, server_default="in_flight")
    )
    response_status: int | None = Field(default=None, sa_column=Column(SmallInteger))
    response_body: dict[str, Any] | None = _json_column("null", nullable=True)
    created_at: datetime | None = _now_column()
    expires_at: datetime = Field(sa_column=Column(TIMEZONE, nullable=False))
    # The fencing token of the current claim (a takeover draws a new one): only its holder
    # completes or releases the key.
    token: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        sa_column=Column(UUID, nullable=False, server_default=text("gen_random_uuid()")),
    )
    # Set inside the route's own transaction: its work committed (never run again).
    executed_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    # What the request created (a path re-read to answer a retry whose response was lost).
    resource: str | None = Field(default=None, sa_column=Column(Text))


class ReconcileRun(SQLModel, table=True):
    """One run of the reconcile workflow (idempotent by `run_key`, the schedule's slot)."""

    __tablename__ = "reconcile_runs"
    __table_args__ = (
        UniqueConstraint("run_key", name="uq_reconcile_runs_run_key"),
        Index("ix_reconcile_runs_started", "started_at", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger, Identity(start=1), primary_key=True)
    )
    run_key: str = Field(sa_column=Column(Text, nullable=False))
    started_at: datetime | None = _now_column()
    finished_at: datetime | None = Field(default=None, sa_column=Column(TIMEZONE))
    marked_offline: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    drifted: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    summary: dict[str, Any] | None = _json_column()


class ReconcileDrift(SQLModel, table=True):
    """Desired-vs-actual drift counted by one reconcile run, by release pair, status and place
    (region, model, org: a scoped caller sees only its rows). A NULL release is stored as ''."""

    __tablename__ = "reconcile_drift"
    __table_args__ = (
        PrimaryKeyConstraint(
            "run_id",
            "desired_release_version",
            "actual_release_version",
            "status",
            "region",
            "model",
            "org",
        ),
    )

    run_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    desired_release_version: str = Field(sa_column=Column(Text, nullable=False))
    actual_release_version: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(Text, nullable=False))
    region: str = Field(sa_column=Column(Text, nullable=False))
    model: str = Field(sa_column=Column(Text, nullable=False))
    org: str = Field(sa_column=Column(Text, nullable=False))
    vehicles: int = Field(sa_column=Column(Integer, nullable=False))


class _FleetPlace(SQLModel):
    """Where a count is: the place columns shared by the fleet summary's tables."""

    model: str = Field(sa_type=Text, nullable=False)
    region: str = Field(sa_type=Text, nullable=False)
    ring: str = Field(sa_type=Text, nullable=False)
    org: str = Field(sa_type=Text, nullable=False)
    vehicles: int = Field(sa_type=BigInteger, nullable=False)


class FleetCount(_FleetPlace, table=True):
    """Vehicles per place and status, refreshed by each reconcile run (migration 0006)."""

    __tablename__ = "fleet_counts"
    __table_args__ = (PrimaryKeyConstraint("model", "region", "ring", "org", "status"),)

    status: str = Field(sa_type=Text, nullable=False)


class FleetReasonCount(_FleetPlace, table=True):
    """Vehicles per place and reason code, refreshed with `fleet_counts`."""

    __tablename__ = "fleet_reason_counts"
    __table_args__ = (PrimaryKeyConstraint("model", "region", "ring", "org", "reason_code"),)

    reason_code: str = Field(sa_type=Text, nullable=False)


class FleetCountsMeta(SQLModel, table=True):
    """When `fleet_counts` were last computed, and how long it took (one row)."""

    __tablename__ = "fleet_counts_meta"
    __table_args__ = (CheckConstraint("id = 1", name="ck_fleet_counts_meta_one_row"),)

    id: int = Field(sa_column=Column(SmallInteger, primary_key=True))
    refreshed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    seconds: float = Field(sa_column=Column(Float, nullable=False))


class VehicleByStatus(SQLModel, table=True):
    """One `(status, id)` key per vehicle, kept equal to `vehicles` by statement triggers
    (migration 0011): the fleet in status order, and the vehicles of one status."""

    __tablename__ = "vehicles_by_status"

    status: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
