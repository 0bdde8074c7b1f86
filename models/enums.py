"""Status names and other enumerations of the contract (SPEC.md). Never rename a value."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class VehicleStatus(StrEnum):
    IN_SYNC = "in_sync"
    PENDING = "pending"
    UPDATING = "updating"
    BLOCKED = "blocked"
    FAILED = "failed"
    OFFLINE = "offline"


class RolloutStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"


TERMINAL_ROLLOUT_STATUSES = frozenset(
    {
        RolloutStatus.COMPLETED,
        RolloutStatus.ROLLED_BACK,
        RolloutStatus.ABORTED,
        RolloutStatus.FAILED,
    }
)


class StatusReason(StrEnum):
    """A rollout's `statusReason`: why it is in its status (SPEC.md)."""

    OPERATOR = "OPERATOR"  # an operator paused, aborted or rolled it back
    FAILURE_THRESHOLD = "FAILURE_THRESHOLD"  # too many of its vehicles failed
    CANARY_UNHEALTHY = "CANARY_UNHEALTHY"  # its canary did not prove the release healthy
    OUTSIDE_MAINTENANCE_WINDOW = "OUTSIDE_MAINTENANCE_WINDOW"  # waits for the window to open
    ACTIVITY_FAILED = "ACTIVITY_FAILED"  # an activity failed for good: the rollout failed
    WORKFLOW_START_FAILED = "WORKFLOW_START_FAILED"  # stored, but its workflow never started


class TargetState(StrEnum):
    """A vehicle's state inside one rollout (rollout_targets.state)."""

    PLANNED = "planned"
    NOTIFIED = "notified"
    UPDATING = "updating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BLOCKED = "blocked"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"


class EventType(StrEnum):
    DESIRED_NOTIFIED = "desired_notified"
    APPLY_START = "apply_start"
    READY = "ready"
    FAILED = "failed"
    BLOCKED = "blocked"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    DEVICE = "device"
    GATEWAY = "gateway"


class AuditSource(StrEnum):
    API = "api"
    TEMPORAL = "temporal"
    SYSTEM = "system"


KNOWN_REASON_CODES = (
    "BATTERY_LOW",
    "NOT_STATIONARY",
    "OUTSIDE_MAINTENANCE_WINDOW",
    "NETWORK_UNREACHABLE",
    "INSUFFICIENT_STORAGE",
    "SIGNATURE_INVALID",
    "APPLY_FAILED",
    "APPLY_TIMEOUT",
)


# A maintenance window's days, in `date.weekday()` order (Monday first).
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
