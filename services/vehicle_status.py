"""A vehicle's status, derived by one pure function (SPEC.md, Vehicles and telemetry).

Inputs: the desired state (release and desired-state id), the release the vehicle reports
running, its latest timeline event (by `(epoch, seq)`), when it was last seen and when it was
registered. No I/O: the telemetry path, the consistency check and the tests call it alike.

Rules, first match wins:

1. `offline`: no heartbeat for `offline_after` seconds (a vehicle never seen counts from its
   registration). Offline wins over every other status; the reason codes are those of the
   status underneath (so a failed vehicle that goes silent still says why it failed).
2. No desired release: `in_sync` (there is nothing to converge to).
3. The actual release equals the desired one: `in_sync`.
4. The latest event is about the current desired state (same `desiredStateId`; an event
   without one counts when its `releaseVersion` is the desired release):
   `desired_notified` / `apply_start` -> `updating`; `ready` -> `in_sync`;
   `failed` -> `failed` and `blocked` -> `blocked`, each with the event's reason code.
5. Otherwise `pending`: a desired state not yet acknowledged (an event about an older
   desired state is stale and says nothing about this one).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from models.enums import EventType, VehicleStatus


class LatestEvent(NamedTuple):
    type: str
    desired_state_id: str | None = None
    release_version: str | None = None
    reason_code: str | None = None


class DerivedStatus(NamedTuple):
    status: VehicleStatus
    reason_codes: tuple[str, ...] = ()


# Immutable (tuples), so the verdicts without reason codes are shared: the telemetry path
# derives a status for every vehicle whose latest event moved, at fleet rate.
_IN_SYNC = DerivedStatus(VehicleStatus.IN_SYNC)
_UPDATING = DerivedStatus(VehicleStatus.UPDATING)
_PENDING = DerivedStatus(VehicleStatus.PENDING)
_MOVING = (EventType.DESIRED_NOTIFIED, EventType.APPLY_START)


def event_applies(
    event: LatestEvent | None, *, desired_state_id: str | None, desired_release: str | None
) -> bool:
    """Whether the event is about the vehicle's current desired state."""
    if event is None:
        return False
    if event.desired_state_id is not None:
        return desired_state_id is not None and str(event.desired_state_id) == str(desired_state_id)
    return event.release_version is not None and event.release_version == desired_release


def derive_status(
    *,
    desired_release: str | None,
    desired_state_id: str | None,
    actual_release: str | None,
    latest_event: LatestEvent | None,
    last_seen_at: datetime | None,
    registered_at: datetime | None,
    now: datetime,
    offline_after_seconds: int,
) -> DerivedStatus:
    underlying = _converging_status(
        desired_release=desired_release,
        desired_state_id=desired_state_id,
        actual_release=actual_release,
        latest_event=latest_event,
    )
    seen = last_seen_at or registered_at
    if seen is not None and (now - seen).total_seconds() > offline_after_seconds:
        return DerivedStatus(VehicleStatus.OFFLINE, underlying.reason_codes)
    return underlying


def _converging_status(
    *,
    desired_release: str | None,
    desired_state_id: str | None,
    actual_release: str | None,
    latest_event: LatestEvent | None,
) -> DerivedStatus:
    if desired_release is None or actual_release == desired_release:
        return _IN_SYNC
    if latest_event is not None and event_applies(
        latest_event, desired_state_id=desired_state_id, desired_release=desired_release
    ):
        kind = latest_event.type
        if kind in _MOVING:
            return _UPDATING
        if kind == EventType.READY:
            return _IN_SYNC
        if kind == EventType.FAILED:
            return DerivedStatus(VehicleStatus.FAILED, _codes(latest_event.reason_code))
        if kind == EventType.BLOCKED:
            return DerivedStatus(VehicleStatus.BLOCKED, _codes(latest_event.reason_code))
    return _PENDING


def _codes(code: str | None) -> tuple[str, ...]:
    return (code,) if code else ()
