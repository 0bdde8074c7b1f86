"""Gate arithmetic, maintenance windows and the retry backoff: pure, table-driven. Which
failures are retried is tested on the SQL that decides it (tests/services/rollouts/
test_retry_rule.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from models.workflows import (
    GateCounts,
    GateDecision,
    GatePolicy,
    MaintenanceWindowSpec,
    RolloutCounts,
    Sweep,
)
from workflows.policy import (
    canary_healthy,
    counted_total,
    decide,
    failure_threshold_breached,
    gate_policy,
    next_window_start,
    retry_backoff_seconds,
    rollout_policy,
    settle_detail,
    sweeps_due,
    unsettled,
    window_open,
)


def c(**kw: int) -> GateCounts:
    return GateCounts(**kw)


@pytest.mark.parametrize(
    ("counts", "rate", "samples", "healthy"),
    [
        (c(succeeded=5), 0.95, 1, True),
        (c(succeeded=19, failed=1), 0.95, 1, True),  # exactly 95%
        (c(succeeded=18, failed=2), 0.95, 1, False),
        (c(succeeded=2, notified=3), 0.95, 3, False),  # too few reported
        (c(succeeded=3, notified=2), 0.95, 3, True),
        (c(notified=5), 0.95, 1, False),  # nobody reported
        (c(notified=5), 0.95, 0, True),  # minSamples 0: nothing to prove
        (c(succeeded=1, failed=1, blocked=10), 0.5, 2, True),  # blocked are not reported
        (c(succeeded=0, failed=3), 0.0, 1, True),
    ],
)
def test_canary_healthy(counts: GateCounts, rate: float, samples: int, healthy: bool) -> None:
    assert canary_healthy(counts, min_success_rate=rate, min_samples=samples) is healthy


@pytest.mark.parametrize(
    ("counts", "rate", "breached"),
    [
        (c(), 0.05, False),  # nothing notified
        (c(notified=100, failed=5), 0.05, False),  # 5/105 < 5%
        (c(notified=95, failed=5), 0.05, False),  # exactly 5%: not more
        (c(notified=94, failed=6), 0.05, True),
        (c(failed=1), 0.99, True),
        (c(failed=1), 1.0, False),
        (c(notified=10, blocked=10, updating=10, succeeded=10, failed=2), 0.04, True),
    ],
)
def test_failure_threshold(counts: GateCounts, rate: float, breached: bool) -> None:
    assert failure_threshold_breached(counts, max_failure_rate=rate) is breached


WAIT = ("wait", None)
PAUSE_POLICY = GatePolicy(min_success_rate=0.9, min_samples=2, max_failure_rate=0.2)
ROLLBACK_POLICY = PAUSE_POLICY.model_copy(update={"failure_action": "rollback"})


@pytest.mark.parametrize(
    ("policy", "total", "stage", "is_canary", "bake_done", "acked", "forced", "expected"),
    [
        # baking, healthy so far
        (PAUSE_POLICY, c(notified=10), c(notified=10), True, False, 0, False, ("wait", None)),
        # canary bake over, healthy
        (PAUSE_POLICY, c(succeeded=10), c(succeeded=10), True, True, 0, False, ("proceed", None)),
        # canary settled and baked, too few samples (blocked vehicles have not reported)
        (
            PAUSE_POLICY,
            c(succeeded=1, blocked=9),
            c(succeeded=1, blocked=9),
            True,
            True,
            0,
            False,
            ("pause", "CANARY_UNHEALTHY"),
        ),
        # an unhealthy canary forced by an operator
        (
            PAUSE_POLICY,
            c(succeeded=1, blocked=9),
            c(succeeded=1, blocked=9),
            True,
            True,
            0,
            True,
            ("proceed", None),
        ),
        # a wave is not held to the canary rule
        (PAUSE_POLICY, c(blocked=10), c(blocked=10), False, True, 0, False, ("proceed", None)),
        # never judged before every vehicle has an outcome: still applying...
        (PAUSE_POLICY, c(notified=10), c(notified=10), False, True, 0, False, ("wait", None)),
        (PAUSE_POLICY, c(succeeded=9, updating=1), c(updating=1), True, True, 0, False, WAIT),
        # ...or failed with a retry to come
        (
            PAUSE_POLICY,
            c(succeeded=9, failed=1),
            c(failed=1, retryable=1),
            False,
            True,
            0,
            False,
            WAIT,
        ),
        # failure threshold mid-bake: pause...
        (
            PAUSE_POLICY,
            c(notified=7, failed=3),
            c(failed=3),
            False,
            False,
            0,
            False,
            ("pause", "FAILURE_THRESHOLD"),
        ),
        # ...or rollback, as the gate's action says
        (
            ROLLBACK_POLICY,
            c(notified=7, failed=3),
            c(failed=3),
            False,
            False,
            0,
            False,
            ("rollback", "FAILURE_THRESHOLD"),
        ),
        # the threshold wins over an unhealthy canary
        (
            PAUSE_POLICY,
            c(notified=7, failed=3),
            c(notified=7, failed=3),
            True,
            True,
            0,
            False,
            ("pause", "FAILURE_THRESHOLD"),
        ),
        # failures an operator acknowledged (resume) are not counted again
        (PAUSE_POLICY, c(notified=7, failed=3), c(), False, False, 3, False, ("wait", None)),
        (
            PAUSE_POLICY,
            c(notified=4, failed=6),
            c(),
            False,
            False,
            3,
            False,
            ("pause", "FAILURE_THRESHOLD"),
        ),
    ],
)
def test_decide(
    policy: GatePolicy,
    total: GateCounts,
    stage: GateCounts,
    is_canary: bool,
    bake_done: bool,
    acked: int,
    forced: bool,
    expected: tuple[str, str | None],
) -> None:
    decision = decide(
        policy=policy,
        total=total,
        stage=stage,
        is_canary=is_canary,
        bake_done=bake_done,
        acknowledged_failed=acked,
        canary_forced=forced,
    )
    assert (decision.action, decision.reason) == expected
    if decision.reason:
        assert decision.detail


def test_gate_policy_defaults_and_values() -> None:
    assert gate_policy(None) == GatePolicy()
    assert gate_policy(
        {
            "canaryHealthy": {"minSuccessRate": 0.8, "minSamples": 4},
            "failureThreshold": {"maxFailureRate": 0.1, "action": "rollback"},
        }
    ) == GatePolicy(
        min_success_rate=0.8, min_samples=4, max_failure_rate=0.1, failure_action="rollback"
    )
    policy = rollout_policy(
        {
            "safetyChecks": {
                "requireStationary": False,
                "minBatteryPercent": 50,
                "maintenanceWindow": {
                    "start": "22:00",
                    "end": "04:00",
                    "timezone": "Europe/Berlin",
                    "days": ["sat"],
                },
            }
        },
        {"applySeconds": 600},
        {"maxAttempts": 3, "backoffSeconds": 60},
    )
    assert policy.window is not None and policy.window.days == ["sat"]
    assert (policy.require_stationary, policy.min_battery_percent) == (False, 50)
    assert (policy.apply_seconds, policy.max_attempts, policy.backoff_seconds) == (600, 3, 60)


def utc(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


NIGHT_BERLIN = MaintenanceWindowSpec(
    start="22:00", end="04:00", timezone="Europe/Berlin", days=["fri", "sat"]
)
DAY_UTC = MaintenanceWindowSpec(
    start="09:00", end="17:00", days=["mon", "tue", "wed", "thu", "fri"]
)
ALL_DAY = MaintenanceWindowSpec(start="00:00", end="00:00", days=["sun"])

# 2026-11-27 is a Friday; Berlin is UTC+1 in winter, UTC+2 in summer.


@pytest.mark.parametrize(
    ("window", "now", "is_open", "next_start"),
    [
        (None, "2026-11-27T12:00:00", True, "2026-11-27T12:00:00"),
        # weekday office hours
        (DAY_UTC, "2026-11-27T08:59:00", False, "2026-11-27T09:00:00"),
        (DAY_UTC, "2026-11-27T09:00:00", True, "2026-11-27T09:00:00"),
        (DAY_UTC, "2026-11-27T17:00:00", False, "2026-11-30T09:00:00"),  # Fri -> Mon
        # crosses midnight, local zone: Fri 22:00 Berlin = 21:00 UTC
        (NIGHT_BERLIN, "2026-11-27T20:59:00", False, "2026-11-27T21:00:00"),
        (NIGHT_BERLIN, "2026-11-27T23:30:00", True, "2026-11-27T23:30:00"),
        # Saturday 02:00 Berlin: still Friday's window
        (NIGHT_BERLIN, "2026-11-28T01:00:00", True, "2026-11-28T01:00:00"),
        # Sunday 02:00 Berlin: Saturday's window; Sunday 04:00 Berlin closed until next Friday
        (NIGHT_BERLIN, "2026-11-29T01:00:00", True, "2026-11-29T01:00:00"),
        (NIGHT_BERLIN, "2026-11-29T03:00:00", False, "2026-12-04T21:00:00"),
        # summer time: Fri 22:00 Berlin = 20:00 UTC
        (NIGHT_BERLIN, "2026-07-03T19:00:00", False, "2026-07-03T20:00:00"),
        # start == end: the whole day
        (ALL_DAY, "2026-11-29T13:00:00", True, "2026-11-29T13:00:00"),
        (ALL_DAY, "2026-11-28T13:00:00", False, "2026-11-29T00:00:00"),
    ],
)
def test_maintenance_window(
    window: MaintenanceWindowSpec | None, now: str, is_open: bool, next_start: str
) -> None:
    assert window_open(utc(now), window) is is_open
    assert next_window_start(utc(now), window) == utc(next_start)


def test_a_window_without_days_never_opens() -> None:
    never = MaintenanceWindowSpec(start="01:00", end="02:00", days=[])
    assert not window_open(utc("2026-11-27T01:30:00"), never)
    assert next_window_start(utc("2026-11-27T01:30:00"), never) is None


@pytest.mark.parametrize(
    ("attempt", "base", "wait"),
    [(1, 300, 300), (2, 300, 600), (3, 300, 1200), (10, 300, 21600), (1, 0, 0), (3, 86400, 86400)],
)
def test_backoff(attempt: int, base: int, wait: int) -> None:
    assert retry_backoff_seconds(attempt, base_seconds=base) == wait


T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
EXPIRE, RETRY, RECHECK = (
    Sweep.EXPIRE_APPLY_TIMEOUTS,
    Sweep.RETRY_FAILED_TARGETS,
    Sweep.RECHECK_BLOCKED,
)


@pytest.mark.parametrize(
    ("counts", "minutes_since_issue", "rollback", "due"),
    [
        (GateCounts(), 120, False, []),  # nothing to do
        (GateCounts(notified=3), 59, False, []),  # applying, not yet timed out
        (GateCounts(notified=3), 60, False, [EXPIRE]),
        (GateCounts(updating=1), 61, False, [EXPIRE]),
        (GateCounts(succeeded=5), 61, False, []),  # nobody applying: no timeout pass
        (
            GateCounts(notified=1, failed=2, retryable=2, blocked=1),
            61,
            False,
            [EXPIRE, RETRY, RECHECK],
        ),
        (GateCounts(failed=2, retryable=0), 61, False, []),  # no attempts left
        (GateCounts(blocked=4), 0, False, [RECHECK]),
        (GateCounts(notified=2), None, False, []),  # nothing issued yet
        # a rollback: its returned vehicles time out at once, nothing retried or re-checked
        (GateCounts(notified=2, retryable=1, blocked=1), 0, True, [EXPIRE]),
        (GateCounts(succeeded=2, retryable=1, blocked=1), 0, True, []),
    ],
)
def test_sweeps_due(
    counts: GateCounts, minutes_since_issue: int | None, rollback: bool, due: list[Sweep]
) -> None:
    issued = None if minutes_since_issue is None else T0 - timedelta(minutes=minutes_since_issue)
    assert (
        sweeps_due(counts, now=T0, first_issued_at=issued, apply_seconds=3600, rollback=rollback)
        == due
    )


def test_nothing_is_retried_or_rechecked_while_the_window_is_closed() -> None:
    counts = GateCounts(notified=1, failed=2, retryable=2, blocked=1)
    issued = T0 - timedelta(hours=2)
    assert sweeps_due(
        counts, now=T0, first_issued_at=issued, apply_seconds=3600, window_open=False
    ) == [EXPIRE]  # a timeout issues nothing: it still runs


@pytest.mark.parametrize(
    ("stage", "left", "detail"),
    [
        (GateCounts(), 0, "0 of 0 vehicles still applying"),
        (GateCounts(succeeded=4, failed=1, blocked=2), 0, "0 of 7 vehicles still applying"),
        (
            GateCounts(notified=40, updating=3, succeeded=457),
            43,
            "43 of 500 vehicles still applying",
        ),
        (
            GateCounts(succeeded=8, failed=2, retryable=1),
            1,
            "0 of 10 vehicles still applying, 1 to be retried",
        ),
        # Notified again after a block (the soak's moving vehicles), applying or not: not
        # waited for...
        (
            GateCounts(notified=31, updating=6, rechecked=37, succeeded=3894, blocked=69),
            0,
            "0 of 4000 vehicles still applying",
        ),
        # ... while the others are, as ever (12 + 3 without an outcome, 10 of them re-checked).
        (
            GateCounts(notified=12, rechecked=10, updating=3, succeeded=85),
            5,
            "5 of 100 vehicles still applying",
        ),
    ],
)
def test_a_stage_settles_once_every_vehicle_has_an_outcome(
    stage: GateCounts, left: int, detail: str
) -> None:
    assert unsettled(stage) == left
    assert settle_detail(stage) == detail


def test_the_counters_give_the_whole_rollouts_gate_counts() -> None:
    counts = RolloutCounts(
        targeted=100, notified=40, updating=5, succeeded=20, failed=6, blocked=2, pending=60
    )
    total = counted_total(counts)
    assert total == GateCounts(notified=7, updating=5, succeeded=20, failed=6, blocked=2)
    assert total.issued == counts.notified
    # 6 of 40 is over 10%: what issuing checks between batches
    assert failure_threshold_breached(total, max_failure_rate=0.1)


@pytest.mark.parametrize(
    ("total", "waits"),
    [
        (c(succeeded=59, notified=1), True),  # a vehicle of an earlier stage retried since
        (c(succeeded=59, updating=1), True),  # ... and applying
        (c(succeeded=59, notified=1, rechecked=1), False),  # a blocked one notified again
        (c(succeeded=59, updating=1, rechecked=1), False),  # ... and applying
    ],
)
def test_the_last_stage_waits_for_the_whole_rollout_to_settle(
    total: GateCounts, waits: bool
) -> None:
    stage = c(succeeded=30)  # wave-2 settled and baked

    def judge(is_last: bool) -> GateDecision:
        return decide(
            policy=PAUSE_POLICY,
            total=total,
            stage=stage,
            is_canary=False,
            bake_done=True,
            is_last=is_last,
        )

    assert judge(False).action == "proceed"  # not the last stage
    last = judge(True)
    if waits:
        assert (last.action, last.detail) == (
            "wait",
            "the rollout: 1 of 60 vehicles still applying",
        )
    else:
        assert last.action == "proceed"
