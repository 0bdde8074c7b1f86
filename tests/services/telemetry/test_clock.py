"""The clock and counter rules of telemetry (services/telemetry/clock.py) and how a group
merges by them (group.py `merge`): pure, no servers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.scope import Scope
from models.telemetry import TelemetryBatch
from services.telemetry.clock import future_fields, heartbeat_time, seq_jump_too_far
from services.telemetry.group import Group, GroupRequest, GroupResult, WideWritePolicy, merge

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def iso(t: datetime) -> str:
    return t.isoformat()


def batch(
    heartbeats: Sequence[dict[str, Any]] = (), events: Sequence[dict[str, Any]] = ()
) -> TelemetryBatch:
    return TelemetryBatch.model_validate_json(
        json.dumps({"heartbeats": list(heartbeats), "events": list(events)})
    )


def hb(sent_at: datetime, battery: int = 50, vid: str = "V1") -> dict[str, Any]:
    return {"vehicleId": vid, "sentAt": iso(sent_at), "batteryPercent": battery}


def ev(seq: int, occurred_at: datetime = NOW, epoch: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "eventId": str(uuid.uuid4()),
        "vehicleId": "V1",
        "seq": seq,
        "type": "apply_start",
        "occurredAt": iso(occurred_at),
    }
    if epoch is not None:
        body["epoch"] = epoch
    return body


def test_times_past_the_skew_are_named_field_by_field() -> None:
    far = datetime(2099, 1, 1, tzinfo=UTC)
    details = future_fields(
        batch(
            [hb(NOW), hb(far)],
            [ev(1, far), ev(2, NOW, epoch=int(NOW.timestamp()) + 301)],
        ),
        received_at=NOW,
        max_skew_seconds=300,
    )
    assert [(d["field"], d["index"]) for d in details] == [
        ("heartbeats.1.sentAt", 1),
        ("events.0.occurredAt", 0),
        ("events.1.epoch", 1),
    ]


def test_times_within_the_skew_and_in_the_past_pass() -> None:
    edge = NOW + timedelta(seconds=300)
    assert (
        future_fields(
            batch(
                [hb(edge), hb(NOW - timedelta(days=3650))],
                [ev(1, edge, epoch=int(edge.timestamp())), ev(2, NOW, epoch=3)],
            ),
            received_at=NOW,
            max_skew_seconds=300,
        )
        == []
    )


def test_a_heartbeat_is_ordered_by_its_sent_at_capped_at_its_arrival() -> None:
    assert heartbeat_time(NOW - timedelta(seconds=5), NOW) == NOW - timedelta(seconds=5)
    assert heartbeat_time(NOW + timedelta(seconds=299), NOW) == NOW


@pytest.mark.parametrize(
    ("stored", "new", "too_far"),
    [
        ((0, 10), (0, 11), False),
        # Past the stored seq by more than the bound, but not past the server's clock in ms:
        # taken (a device numbering its events by its clock, silent for 17 minutes).
        ((0, 10), (0, 1_000_011), False),
        ((0, NOW_MS - 1_020_000), (0, NOW_MS), False),
        ((0, NOW_MS), (0, NOW_MS + 1_000_000), False),  # exactly the bound past both
        ((0, NOW_MS), (0, NOW_MS + 1_000_001), True),
        ((0, 1), (0, NOW_MS + 1_000_001), True),
        ((0, 0), (0, 2**63 - 1), True),  # one huge seq
        ((NOW_MS, 10**15), (NOW_MS, 10**15 + 1_000_000), False),  # the bound past the stored
        ((NOW_MS, 10**15), (NOW_MS, 10**15 + 1_000_001), True),
        ((0, 5_000), (7, 1), False),  # a counter restart: a new epoch from 1
        ((0, 10**15), (7, NOW_MS + 1_000_001), True),  # a new epoch counts from 0
        ((7, 3), (0, 2**63 - 1), False),  # an older epoch: late, moves nothing
        ((7, 3), (7, 2), False),  # late within the epoch
    ],
)
def test_how_far_a_seq_may_jump(
    stored: tuple[int, int], new: tuple[int, int], too_far: bool
) -> None:
    assert (
        seq_jump_too_far(
            stored_epoch=stored[0],
            stored_seq=stored[1],
            epoch=new[0],
            seq=new[1],
            max_jump=1_000_000,
            clock_ms=NOW_MS,
        )
        is too_far
    )


def _merged(*requests: GroupRequest) -> Group:
    group = Group(
        session=None,  # type: ignore[arg-type]  # merge touches no connection
        driver=None,  # type: ignore[arg-type]
        policy=WideWritePolicy(),
        now=NOW,
        live=list(requests),
        result=GroupResult(),
    )
    merge(group)
    return group


def test_a_heartbeat_claiming_the_future_does_not_outrank_the_next_one() -> None:
    """Within the skew, a device dated 299 s ahead arrives first; an honest heartbeat sent
    10 s later wins: its values are the vehicle's, and lastSeenAt is the later arrival."""
    ahead = GroupRequest(
        batch=batch([hb(NOW + timedelta(seconds=299), battery=10)]),
        scope=Scope(),
        received_at=NOW,
    )
    honest = GroupRequest(
        batch=batch([hb(NOW + timedelta(seconds=10), battery=90)]),
        scope=Scope(),
        received_at=NOW + timedelta(seconds=10),
    )
    merged, at, received = _merged(ahead, honest).heartbeats["V1"]
    assert merged.battery_percent == 90
    assert at == NOW + timedelta(seconds=10)
    assert received == NOW + timedelta(seconds=10)


def test_a_late_heartbeat_refreshes_liveness_only() -> None:
    """A heartbeat sent before the one already merged, delivered after it, keeps the newer
    values but moves lastSeenAt to its arrival."""
    newer = GroupRequest(
        batch=batch([hb(NOW - timedelta(seconds=10), battery=70)]), scope=Scope(), received_at=NOW
    )
    late = GroupRequest(
        batch=batch([hb(NOW - timedelta(seconds=60), battery=20)]),
        scope=Scope(),
        received_at=NOW + timedelta(seconds=1),
    )
    merged, at, received = _merged(newer, late).heartbeats["V1"]
    assert merged.battery_percent == 70
    assert at == NOW - timedelta(seconds=10)
    assert received == NOW + timedelta(seconds=1)


def test_the_latest_event_of_a_group_is_the_greatest_epoch_then_seq() -> None:
    old_counter = GroupRequest(batch=batch(events=[ev(5_000)]), scope=Scope(), received_at=NOW)
    restarted = GroupRequest(
        batch=batch(events=[ev(1, epoch=1_800_000_000), ev(2, epoch=1_800_000_000)]),
        scope=Scope(),
        received_at=NOW,
    )
    latest = _merged(old_counter, restarted).latest["V1"]
    assert (latest.epoch, latest.seq) == (1_800_000_000, 2)
