"""A group of telemetry requests: what the committer hands in (`GroupRequest`), what it gets
back (`GroupResult`), and the state each step of `write_group` reads and fills (`Group`)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from sqlmodel.ext.asyncio.session import AsyncSession

from models.defaults import (
    DEFAULT_MAX_SEQ_JUMP,
    DEFAULT_OFFLINE_AFTER_SECONDS,
    DEFAULT_TELEMETRY_BATTERY_STEP,
    DEFAULT_TELEMETRY_REFRESH_SECONDS,
)
from models.scope import Scope
from models.telemetry import EventIn, HeartbeatIn, TelemetryBatch


@dataclass(frozen=True)
class WideWritePolicy:
    """When the wide `vehicles` row is rewritten for a heartbeat (docs/data-model.md), and
    how far an event's `seq` may jump (services/telemetry/clock.py)."""

    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    refresh_seconds: int = DEFAULT_TELEMETRY_REFRESH_SECONDS
    battery_step: int = DEFAULT_TELEMETRY_BATTERY_STEP
    max_seq_jump: int = DEFAULT_MAX_SEQ_JUMP


@dataclass
class GroupRequest:
    """One request inside a group, and what the group did for it."""

    batch: TelemetryBatch
    scope: Scope
    accepted: int = 0
    duplicates: int = 0
    refused: list[dict[str, Any]] | None = None  # NOT_FOUND details when refused
    # When the request arrived (the server's clock): its heartbeats' lastSeenAt, and the
    # latest time their values can claim. None: the group's `now`.
    received_at: datetime | None = None
    # VALIDATION_ERROR details when refused for a `seq` jumping too far (lock.py); unlike
    # `refused`, kept when the group is written again: it is what the group is redone for.
    invalid: list[dict[str, Any]] | None = None


@dataclass
class GroupResult:
    events_inserted: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    vehicles_written: int = 0
    outcomes: int = 0
    # Per rollout whose targets this group moved, how many: the rollouts whose gates must
    # look again once the group is committed (`TelemetryIngestor`'s `on_outcomes`).
    rollouts_moved: dict[int, int] = field(default_factory=dict)
    refused_requests: int = 0
    stats: dict[str, float] = field(default_factory=dict)


class Redo(Exception):
    """Roll the group back and write it again, checked."""


class UnknownVehicle(Redo):
    """The optimistic pass found a vehicle it could not resolve."""


class SeqJumped(Redo):
    """An event's `seq` jumps too far past its vehicle's newest stored (clock.py): the
    requests holding such events are refused and the group written again without them.
    `stored` holds the newest stored (epoch, seq) of the vehicles locked."""

    def __init__(self, stored: dict[str, tuple[int, int]]) -> None:
        super().__init__("a seq jumps too far")
        self.stored = stored


class RowMoved(Redo):
    """A locked wide row was not where the lock found it. Only this transaction can move a
    row it holds locked, and the heartbeat refresh leaves those rows to the wide update
    (test_a_vehicle_both_derived_and_refreshed_in_one_group_is_written_once): guarded all
    the same, so a miss rewrites the group instead of losing a status."""


class LockedRow(NamedTuple):
    """A vehicle's wide row as read under the lock, merged with the group's news: its
    heartbeat (narrow row) and its latest event, whichever is newer. Fields in the order the
    statement selects them."""

    vehicle_id: str
    derive: bool  # a new latest event, or flagged: its status is derived
    last_seen_at: datetime | None
    actual_release_version: str | None
    last_event_seq: int  # after this group
    last_event_epoch: int
    last_event_type: str | None
    last_event_desired_state_id: str | None
    last_event_release_version: str | None
    last_event_reason_code: str | None
    status: str
    reason_codes: list[str] | None
    desired_release_version: str | None
    desired_state_id: str | None
    rollout_id: int | None
    created_at: datetime
    stored_seq: int  # before this group
    stored_epoch: int


@dataclass(slots=True)
class Group:
    """One group on its way into PostgreSQL, in one transaction. Each step of `write_group`
    reads what the steps before it left here and adds its own part."""

    session: AsyncSession
    driver: psycopg.AsyncConnection[Any]  # the session's own connection (staging.py)
    policy: WideWritePolicy
    now: datetime
    live: list[GroupRequest]  # the requests not refused
    result: GroupResult
    # merge(): the group as one batch
    owner: dict[tuple[str, uuid.UUID], GroupRequest] = field(default_factory=dict)
    events: list[EventIn] = field(default_factory=list)  # deduplicated, first wins
    # The newest heartbeat per vehicle (`MergedHeartbeat`).
    heartbeats: dict[str, MergedHeartbeat] = field(default_factory=dict)
    latest: dict[str, EventIn] = field(default_factory=dict)  # highest seq per vehicle
    # heartbeats.upsert_narrow_rows: vehicles whose status a heartbeat may change
    flagged: list[str] = field(default_factory=list)
    # lock.lock_wide_rows: the newest (epoch, seq) stored per vehicle, the rows to derive
    stored: dict[str, tuple[int, int]] = field(default_factory=dict)
    to_derive: list[LockedRow] = field(default_factory=list)
    # events.insert_events: the events this transaction stored
    inserted: set[tuple[str, uuid.UUID]] = field(default_factory=set)
    # derive.derive_statuses: one verdict per derived row; those of vehicles in a rollout
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    in_rollouts: list[LockedRow] = field(default_factory=list)
    # outcomes.pick_outcomes: per rollout, the vehicles' new latest events
    outcomes: dict[int, list[EventIn]] = field(default_factory=dict)
    # lap(): wall clock and this process's CPU at the last lap
    clock: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)

    def lap(self, name: str) -> None:
        """Time since the last lap (`name`) and this process's CPU in it (`name_cpu`): the
        difference is time spent waiting for PostgreSQL (debug log of each group)."""
        clock = time.perf_counter()
        cpu = time.process_time()
        stats = self.result.stats
        stats[name] = stats.get(name, 0.0) + clock - self.clock
        stats[f"{name}_cpu"] = stats.get(f"{name}_cpu", 0.0) + cpu - self.cpu
        self.clock = clock
        self.cpu = cpu


# A vehicle's newest heartbeat of the group: (the heartbeat, the time that orders its values
# (`sentAt` capped at its arrival, clock.py), the latest arrival of any heartbeat of the
# vehicle in the group (its lastSeenAt)). A plain tuple: one is built per heartbeat (perf).
MergedHeartbeat = tuple[HeartbeatIn, datetime, datetime]


def merge(group: Group) -> None:
    """The group as one batch: events deduplicated (first wins), the newest heartbeat and
    the greatest-`(epoch, seq)` event per vehicle (ties: the lowest `eventId`, as the SQL
    that stages the group picks it). (An event already stored cannot be the vehicle's new
    latest: its seq was merged when it was stored, in the same transaction.) Heartbeats are
    ordered by `heartbeat_time` (clock.py), the later of equals wins; the vehicle's
    lastSeenAt is the latest arrival of any of its heartbeats."""
    owner = group.owner
    events = group.events
    heartbeats = group.heartbeats
    latest = group.latest
    now = group.now
    for req in group.live:  # their counts were reset when the group was opened
        received = req.received_at or now
        # The arrival in the zone of the heartbeats' times (pydantic's own tzinfo, one
        # object per offset): datetimes of one tzinfo object compare without asking it for
        # its offset, which costs microseconds (perf).
        zone: Any = None
        cap = received
        for ev in req.batch.events:
            key = (ev.vehicle_id, ev.event_id)
            if key in owner:
                req.duplicates += 1
                continue
            owner[key] = req
            events.append(ev)
            best = latest.get(ev.vehicle_id)
            if (
                best is None
                or ev.epoch > best.epoch
                or (
                    ev.epoch == best.epoch
                    and (ev.seq > best.seq or (ev.seq == best.seq and ev.event_id < best.event_id))
                )
            ):
                latest[ev.vehicle_id] = ev
        for hb in req.batch.heartbeats:
            sent = hb.sent_at
            if sent.tzinfo is not zone:
                zone = sent.tzinfo
                cap = received.astimezone(zone)
            at = sent if sent < cap else cap  # clock.heartbeat_time
            newest = heartbeats.get(hb.vehicle_id)
            if newest is None:
                heartbeats[hb.vehicle_id] = (hb, at, received)
            elif at >= newest[1]:
                heartbeats[hb.vehicle_id] = (hb, at, max(received, newest[2]))
            elif received > newest[2]:  # older values, later arrival: liveness only
                heartbeats[hb.vehicle_id] = (newest[0], newest[1], received)
