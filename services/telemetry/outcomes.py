"""Rollout outcomes fed by telemetry, in the group's transaction and after the vehicles (the
lock order: telemetry rows, vehicles, rollout targets). A vehicle's new latest event moves its
rollout target when it is about the desired state that rollout issued to it; an event about
another desired state (stale, or issued outside the rollout) moves nothing."""

from __future__ import annotations

from collections import defaultdict

from models.enums import EventType
from models.telemetry import EventIn
from services.rollouts.outcomes import record_target_outcomes
from services.telemetry.group import Group

OUTCOME_OF_EVENT = {
    EventType.DESIRED_NOTIFIED: "updating",
    EventType.APPLY_START: "updating",
    EventType.READY: "succeeded",
    EventType.FAILED: "failed",
    EventType.BLOCKED: "blocked",
}


def pick_outcomes(group: Group) -> None:
    """Per rollout, the derived vehicles whose latest event is new, stored by this group and
    about a desired state."""
    by_rollout: defaultdict[int, list[EventIn]] = defaultdict(list)
    latest = group.latest
    inserted = group.inserted
    for row in group.in_rollouts:
        vehicle_id = row.vehicle_id
        latest_new = latest.get(vehicle_id)
        if (
            latest_new is not None
            and (vehicle_id, latest_new.event_id) in inserted
            and row.last_event_seq == latest_new.seq
            and row.last_event_epoch == latest_new.epoch
            and row.rollout_id is not None
            and latest_new.desired_state_id is not None
        ):
            by_rollout[int(row.rollout_id)].append(latest_new)
    group.outcomes = by_rollout


async def record_outcomes(group: Group) -> None:
    """Each rollout's outcomes (in rollout id order) through `record_target_outcomes`, which
    moves a target only while it holds the desired state the event is about; the rollouts
    whose targets moved are noted (`GroupResult.rollouts_moved`) for their gates."""
    for rollout_id, events in sorted(group.outcomes.items()):
        moved = await record_target_outcomes(
            group.session,
            rollout_id=rollout_id,
            outcomes=[(e.vehicle_id, OUTCOME_OF_EVENT[e.type], e.reason_code) for e in events],
            about={e.vehicle_id: str(e.desired_state_id) for e in events},
            at=group.now,
        )
        group.result.outcomes += moved
        if moved:
            group.result.rollouts_moved[rollout_id] = moved
