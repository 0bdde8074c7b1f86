"""Vehicle status derivation: the pure rule, table by table (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.vehicle_status import DerivedStatus, LatestEvent, derive_status

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DS = "11111111-1111-1111-1111-111111111111"
OLD_DS = "22222222-2222-2222-2222-222222222222"
FRESH = NOW - timedelta(seconds=30)
STALE = NOW - timedelta(seconds=301)


def ev(kind: str, ds: str | None = DS, reason: str | None = None, rel: str | None = None):  # type: ignore[no-untyped-def]
    return LatestEvent(type=kind, desired_state_id=ds, release_version=rel, reason_code=reason)


@pytest.mark.parametrize(
    ("desired", "actual", "event", "seen", "expected"),
    [
        # no desired release: nothing to converge to
        (None, "1.0", None, FRESH, ("in_sync", ())),
        (None, None, None, FRESH, ("in_sync", ())),
        # actual = desired
        ("2.0", "2.0", None, FRESH, ("in_sync", ())),
        ("2.0", "2.0", ev("failed", reason="APPLY_FAILED"), FRESH, ("in_sync", ())),
        # a new desired state not yet acknowledged
        ("2.0", "1.0", None, FRESH, ("pending", ())),
        # acknowledged / applying
        ("2.0", "1.0", ev("desired_notified"), FRESH, ("updating", ())),
        ("2.0", "1.0", ev("apply_start"), FRESH, ("updating", ())),
        # ready on the current desired state (its heartbeat not yet in)
        ("2.0", "1.0", ev("ready"), FRESH, ("in_sync", ())),
        # failed / blocked carry their reason code
        ("2.0", "1.0", ev("failed", reason="APPLY_FAILED"), FRESH, ("failed", ("APPLY_FAILED",))),
        ("2.0", "1.0", ev("blocked", reason="BATTERY_LOW"), FRESH, ("blocked", ("BATTERY_LOW",))),
        ("2.0", "1.0", ev("failed"), FRESH, ("failed", ())),
        # an unknown well-formed code is kept as sent
        ("2.0", "1.0", ev("failed", reason="FLUX_LOW"), FRESH, ("failed", ("FLUX_LOW",))),
        # events about an older desired state are stale: pending again
        ("2.0", "1.0", ev("ready", ds=OLD_DS), FRESH, ("pending", ())),
        ("2.0", "1.0", ev("failed", ds=OLD_DS, reason="APPLY_FAILED"), FRESH, ("pending", ())),
        # an event without a desiredStateId counts by release version
        ("2.0", "1.0", ev("apply_start", ds=None, rel="2.0"), FRESH, ("updating", ())),
        ("2.0", "1.0", ev("apply_start", ds=None, rel="1.5"), FRESH, ("pending", ())),
        ("2.0", "1.0", ev("apply_start", ds=None), FRESH, ("pending", ())),
        # offline wins over everything, keeping the reason codes underneath
        ("2.0", "2.0", None, STALE, ("offline", ())),
        ("2.0", "1.0", ev("apply_start"), STALE, ("offline", ())),
        ("2.0", "1.0", ev("failed", reason="APPLY_FAILED"), STALE, ("offline", ("APPLY_FAILED",))),
        (None, None, None, STALE, ("offline", ())),
        # exactly at the limit is still online
        ("2.0", "2.0", None, NOW - timedelta(seconds=300), ("in_sync", ())),
    ],
)
def test_derive_status(
    desired: str | None,
    actual: str | None,
    event: LatestEvent | None,
    seen: datetime,
    expected: tuple[str, tuple[str, ...]],
) -> None:
    got = derive_status(
        desired_release=desired,
        desired_state_id=DS if desired else None,
        actual_release=actual,
        latest_event=event,
        last_seen_at=seen,
        registered_at=NOW - timedelta(days=1),
        now=NOW,
        offline_after_seconds=300,
    )
    assert got == DerivedStatus(expected[0], expected[1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        (NOW - timedelta(seconds=10), "pending"),  # just registered, never seen: not offline
        (NOW - timedelta(hours=1), "offline"),  # registered long ago, never seen
        (None, "pending"),  # nothing known: no judgement
    ],
)
def test_never_seen(registered: datetime | None, expected: str) -> None:
    got = derive_status(
        desired_release="2.0",
        desired_state_id=DS,
        actual_release=None,
        latest_event=None,
        last_seen_at=None,
        registered_at=registered,
        now=NOW,
        offline_after_seconds=300,
    )
    assert got.status == expected
