"""Telemetry on the wire (SPEC.md, Vehicles and telemetry): `POST /api/v1/telemetry` bodies,
validated strictly (unknown fields, wrong types, malformed reason codes are refused), and the
device's desired-state and timeline answers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from models.api import CamelModel, DesiredStateConstraints
from models.enums import EventType
from models.storable import StorableText, StorableTime, json_problems, storable_flat

# The error type of a value PostgreSQL cannot store; its `ctx["path"]` continues the field's
# location into `details` (api/routes/telemetry.py names the field with it).
UNSTORABLE = "unstorable"

# Limits of one POST /telemetry (documented in docs/telemetry.md and the OpenAPI text).
MAX_EVENTS_PER_REQUEST = 1000
MAX_HEARTBEATS_PER_REQUEST = 1000
MAX_DETAILS_KEYS = 32

REASON_CODE_PATTERN = r"^[A-Z][A-Z0-9_]{0,63}$"
# What PostgreSQL would refuse inside a group commit (failing every request of the group) is
# refused here, with its request alone: models/storable.py.
VehicleId = Annotated[StorableText, Field(min_length=1, max_length=128)]
Version = Annotated[StorableText, Field(min_length=1, max_length=128)]


class _StrictIn(CamelModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


class HeartbeatIn(_StrictIn):
    vehicle_id: VehicleId
    sent_at: StorableTime
    battery_percent: int | None = Field(None, ge=0, le=100)
    stationary: bool | None = None
    actual_release_version: Version | None = None


class EventIn(_StrictIn):
    event_id: uuid.UUID = Field(description="Chosen by the vehicle; deduplicates.")
    vehicle_id: VehicleId
    seq: int = Field(
        ge=1,
        le=2**63 - 1,
        description="Per vehicle and epoch, increasing from 1: orders events. At most "
        "MOTORCADE_MAX_SEQ_JUMP past the newest stored in the same epoch.",
    )
    epoch: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="The generation of the vehicle's `seq` counter (default 0): a device "
        "whose counter restarts (reinstalled, storage lost) sends a greater epoch, and events "
        "order by (epoch, seq). Suggested: the Unix time, in seconds, at which the counter "
        "started; never more than the server's time plus MOTORCADE_MAX_CLOCK_SKEW_SECONDS.",
    )
    type: EventType
    occurred_at: StorableTime
    desired_state_id: uuid.UUID | None = None
    release_version: Version | None = None
    reason_code: str | None = Field(
        None, pattern=REASON_CODE_PATTERN, description="UPPER_SNAKE, at most 64 characters."
    )
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def _details_storable(cls, details: dict[str, Any]) -> dict[str, Any]:
        if details and not storable_flat(details):
            for path, problem in json_problems(details):
                raise PydanticCustomError(
                    UNSTORABLE,
                    "{problem}",
                    {"problem": problem, "path": path},
                )
        return details

    @model_validator(mode="after")
    def _reason(self) -> EventIn:
        if self.type in (EventType.FAILED, EventType.BLOCKED) and not self.reason_code:
            raise ValueError(f"a {self.type.value} event needs a reasonCode")
        if len(self.details) > MAX_DETAILS_KEYS:
            raise ValueError(f"details holds at most {MAX_DETAILS_KEYS} keys")
        return self


class TelemetryBatch(_StrictIn):
    heartbeats: list[HeartbeatIn] = Field(
        default_factory=list, max_length=MAX_HEARTBEATS_PER_REQUEST
    )
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_EVENTS_PER_REQUEST)


class TelemetryAccepted(CamelModel):
    accepted: int = Field(description="Events newly stored (durable).")
    duplicates: int = Field(description="Events already stored (same vehicleId and eventId).")
    heartbeats: int = Field(0, description="Heartbeats taken in (coalesced per vehicle).")


class VehicleDesiredStateOut(CamelModel):
    vehicle_id: str
    desired_state_id: str | None = None
    release_version: str | None = None
    rollout_id: int | None = None
    components: list[dict[str, Any]] = Field(default_factory=list)
    artifact_digest: str | None = None
    signature: str | None = None
    signing_key_id: str | None = None
    created_at: datetime | None = None
    constraints: DesiredStateConstraints | None = Field(
        None,
        description="The safety checks to apply again before applying (null: no desired state,"
        " or one written before constraints existed).",
    )


class TimelineEventOut(CamelModel):
    event_id: str
    vehicle_id: str
    seq: int
    epoch: int = 0
    type: str
    occurred_at: datetime
    received_at: datetime | None = None
    desired_state_id: str | None = None
    release_version: str | None = None
    reason_code: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
