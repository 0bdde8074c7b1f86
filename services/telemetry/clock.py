"""What a device's clock and counter may decide, and what they may not (SPEC.md, Vehicles and
telemetry; docs/telemetry.md, "Clocks and counters"). Pure rules, unit-tested without servers
(tests/services/telemetry/test_clock.py); the write path applies them set-based.

- Liveness is the server's: `lastSeenAt` is the time the request arrived (`received_at`).
- A `sentAt`, an `occurredAt` or an `epoch` (Unix seconds at most) more than the allowed skew
  past the arrival time is refused, with the whole request (`future_fields`).
- A heartbeat's values are ordered by `heartbeat_time`: its `sentAt`, but never later than
  its arrival, so a device claiming the future (within the skew) cannot outrank the next
  heartbeat, and a late delivery still does not overwrite newer values.
- Events are ordered per vehicle by `(epoch, seq)`: a greater `epoch` starts a new counter
  (a reinstalled device counting from 1 again), and `seq` may run at most `max_seq_jump`
  past the newest stored in the same epoch (`seq_jump_too_far`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from models.telemetry import TelemetryBatch


def future_fields(
    batch: TelemetryBatch, *, received_at: datetime, max_skew_seconds: int
) -> list[dict[str, Any]]:
    """The fields of `batch` dated (or, for `epoch`, numbered in Unix seconds) more than
    `max_skew_seconds` after `received_at`, as validation details; empty when none is."""
    limit = received_at + timedelta(seconds=max_skew_seconds)
    epoch_limit = int(limit.timestamp())
    # The limit in the zone of the times compared (pydantic's tzinfo, one object per
    # offset): datetimes of one tzinfo object compare without asking it for its offset,
    # which costs microseconds a comparison (perf).
    zone: Any = None
    local = limit

    def ahead(at: datetime) -> bool:
        nonlocal zone, local
        if at.tzinfo is not zone:
            zone = at.tzinfo
            local = limit.astimezone(zone)
        return at > local

    message = f"more than {max_skew_seconds} s ahead of the server's clock"
    details: list[dict[str, Any]] = []
    for index, hb in enumerate(batch.heartbeats):
        if ahead(hb.sent_at):
            details.append(_detail(f"heartbeats.{index}.sentAt", index, message))
    for index, ev in enumerate(batch.events):
        if ahead(ev.occurred_at):
            details.append(_detail(f"events.{index}.occurredAt", index, message))
        if ev.epoch > epoch_limit:
            details.append(_detail(f"events.{index}.epoch", index, f"{message} (in Unix seconds)"))
    return details


def _detail(field: str, index: int, message: str) -> dict[str, Any]:
    return {"field": field, "index": index, "message": message, "code": "clock_skew"}


def heartbeat_time(sent_at: datetime, received_at: datetime) -> datetime:
    """The time that orders a heartbeat's values: its `sentAt`, at most its arrival."""
    return sent_at if sent_at < received_at else received_at


def seq_jump_too_far(
    *, stored_epoch: int, stored_seq: int, epoch: int, seq: int, max_jump: int, clock_ms: int
) -> bool:
    """Whether an event would move its vehicle's newest `(epoch, seq)` absurdly far: more
    than `max_jump` past the newest stored `seq` of the same epoch (past 0 in a new epoch)
    and past the server's clock in milliseconds (`clock_ms`, plus the same bound), so a device that
    numbers its events by its clock in milliseconds keeps going however long it was silent.
    An event of an older epoch is late: it moves nothing, so it is never too far."""
    if epoch < stored_epoch:
        return False
    base = stored_seq if epoch == stored_epoch else 0
    return seq > max(base, clock_ms) + max_jump


def clock_milliseconds(now: datetime) -> int:
    """The server's clock as a millisecond counter (what a device numbering its events by
    its clock sends as `seq`)."""
    return int(now.timestamp() * 1000)
