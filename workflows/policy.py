"""Pure rollout rules: stage planning, gate decisions, maintenance windows and retry rules.
No I/O, deterministic.

Called by the rollout services (planning and expanding a rollout, the API's `dryRun`, the
stage names of a rollout's vehicles), by the activities (gate decisions) and by the workflow
(safe inside the sandbox: only the standard library and pydantic models). A request's
strategy is validated by the API's own models (`models.api.Strategy`), before it is stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, get_args
from zoneinfo import ZoneInfo

from models.defaults import (
    DEFAULT_APPLY_SECONDS,
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_FAILURE_ACTION,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MIN_BATTERY_PERCENT,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_MIN_SUCCESS_RATE,
    DEFAULT_REQUIRE_STATIONARY,
    FailureAction,
)
from models.enums import WEEKDAYS, StatusReason
from models.workflows import (
    GateAction,
    GateCounts,
    GateDecision,
    GatePolicy,
    MaintenanceWindowSpec,
    RolloutCounts,
    RolloutPolicy,
    StagePlan,
    Sweep,
)

CANARY = "canary"


def wave_name(number: int) -> str:
    """`wave-1`, `wave-2`, ... (1-based, as in SPEC.md)."""
    return f"wave-{number}"


def _exact(value: float | int) -> Fraction:
    # Through the decimal text, so 33.3 means 333/10 and not its binary approximation.
    return Fraction(Decimal(str(value)))


def _ceil_share(percent: float | int, total: int) -> int:
    return math.ceil(_exact(percent) * total / 100)


def plan_stages(
    targeted: int,
    canary_size: int | None,
    canary_percent: float | None,
    waves: Sequence[float],
    *,
    canary_bake_seconds: int = 0,
    wave_bake_seconds: Sequence[int] | None = None,
) -> list[StagePlan]:
    """Split `targeted` vehicles (ordered by rank) into cumulative, monotonic stages.

    - The canary (when `canary_size` or `canary_percent` is given) holds `canary_size`
      vehicles or `ceil(canary_percent% of targeted)`, at least 1 when targeted > 0, at most
      `targeted`.
    - Wave N ends at `ceil(waves[N]% of targeted)`, never before the previous stage's end
      (the canary counts inside the first waves' share); the last wave ends at `targeted`.
    - Stages may be empty (a small fleet); they keep their index and name so the stage numbers
      always match the strategy. Stage `index` is the position in the returned list.
    """
    if targeted < 0:
        raise ValueError("targeted must be >= 0")
    if not waves:
        raise ValueError("at least one wave is required")
    bakes = list(wave_bake_seconds) if wave_bake_seconds is not None else [0] * len(waves)
    if len(bakes) != len(waves):
        raise ValueError("wave_bake_seconds must have one entry per wave")

    stages: list[StagePlan] = []
    end = 0
    if canary_size is not None or canary_percent is not None:
        if canary_size is not None:
            size = max(0, canary_size)
        else:
            size = _ceil_share(canary_percent or 0, targeted)
        if targeted > 0:
            size = max(1, size)
        end = min(size, targeted)
        stages.append(
            StagePlan(
                index=0,
                name=CANARY,
                start_rank=0,
                end_rank=end,
                bake_seconds=max(0, canary_bake_seconds),
            )
        )
    for number, (percent, bake) in enumerate(zip(waves, bakes, strict=True), start=1):
        start = end
        if number == len(waves):
            end = targeted
        else:
            end = min(targeted, max(start, _ceil_share(percent, targeted)))
        stages.append(
            StagePlan(
                index=len(stages),
                name=wave_name(number),
                start_rank=start,
                end_rank=end,
                bake_seconds=max(0, bake),
            )
        )
    return stages


def plan_from_strategy(targeted: int, strategy: Mapping[str, Any]) -> list[StagePlan]:
    """`plan_stages` for a strategy as stored (camelCase JSON, validated by models.api.Strategy
    when the rollout was created)."""
    canary = strategy.get("canary") or {}
    waves = strategy.get("waves") or []
    return plan_stages(
        targeted,
        canary.get("size"),
        canary.get("percent"),
        [float(w["percent"]) for w in waves],
        canary_bake_seconds=int(canary.get("bakeSeconds") or 0),
        wave_bake_seconds=[int(w.get("bakeSeconds") or 0) for w in waves],
    )


def stage_ends(stages: Sequence[StagePlan]) -> list[int]:
    """The cumulative end rank of each stage: a vehicle of rank r belongs to the first stage
    whose end is greater than r."""
    return [stage.end_rank for stage in stages]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- Gates ---------------------------------------------------------------------------------
#
# Counts come from `rollout_targets` (one GROUP BY state, see services.rollouts.outcomes
# .gate_counts). A target is "issued" once its desired state went out (notified, updating,
# succeeded, failed, blocked); `failed` includes APPLY_TIMEOUT (a timed-out target *is* failed).
#
# - canaryHealthy, after the canary's bake: reported = succeeded + failed among the canary
#   (blocked and still-applying vehicles have not reported an outcome). Healthy when
#   reported >= minSamples and succeeded / reported >= minSuccessRate. With nothing reported,
#   healthy only when minSamples is 0 (an empty canary cannot prove anything else).
# - failureThreshold, at any time: failed / issued over the whole rollout so far (every stage
#   issued up to now) > maxFailureRate, with issued > 0. A vehicle retried after a retryable
#   failure is back to notified and no longer counts as failed.


def _rate(value: Any, default: float) -> float:
    return float(value) if _is_number(value) else default


def gate_policy(gates: Mapping[str, Any] | None) -> GatePolicy:
    """The gate settings of a rollout as stored (camelCase JSON), with SPEC's defaults."""
    gates = gates or {}
    canary = gates.get("canaryHealthy") or {}
    threshold = gates.get("failureThreshold") or {}
    action = threshold.get("action")
    samples = canary.get("minSamples")
    return GatePolicy(
        min_success_rate=_rate(canary.get("minSuccessRate"), DEFAULT_MIN_SUCCESS_RATE),
        min_samples=samples if _is_int(samples) else DEFAULT_MIN_SAMPLES,
        max_failure_rate=_rate(threshold.get("maxFailureRate"), DEFAULT_MAX_FAILURE_RATE),
        failure_action=action if action in get_args(FailureAction) else DEFAULT_FAILURE_ACTION,
    )


def counted_total(counts: RolloutCounts, *, rechecked: int = 0) -> GateCounts:
    """The whole rollout's gate counts from its counters (one row, never a scan): every target
    whose desired state went out is counted once in `notified`, the ones without a current
    outcome are what is left after the current-state counters. What issuing checks between
    batches. `rechecked`: of those without an outcome, notified again by the blocked re-check
    (its counter)."""
    outcomes = counts.updating + counts.succeeded + counts.failed + counts.blocked
    notified = max(0, counts.notified - outcomes)
    return GateCounts(
        notified=notified,
        updating=counts.updating,
        succeeded=counts.succeeded,
        failed=counts.failed,
        blocked=counts.blocked,
        rechecked=min(max(0, rechecked), notified + counts.updating),
    )


def canary_healthy(counts: GateCounts, *, min_success_rate: float, min_samples: int) -> bool:
    reported = counts.succeeded + counts.failed
    if reported == 0:
        return min_samples <= 0
    if reported < min_samples:
        return False
    return Fraction(counts.succeeded, reported) >= _exact(min_success_rate)


def failure_threshold_breached(counts: GateCounts, *, max_failure_rate: float) -> bool:
    issued = counts.issued
    if issued <= 0:
        return False
    return Fraction(counts.failed, issued) > _exact(max_failure_rate)


def unsettled(stage: GateCounts) -> int:
    """The vehicles issued in a stage that have no outcome yet: still notified or applying, or
    failed with a retry to come (a retryable reason, attempts left). `ready`, `failed` for good
    (retries used up, a reason never retried, APPLY_TIMEOUT on the last attempt) and `blocked`
    are outcomes. A stage is settled when this is 0.

    A vehicle notified again by the blocked re-check (`rechecked`, `notified` or `updating`)
    is not waited for: it had its outcome (`blocked`), and in a fleet that moves some always
    are between a re-check and their next outcome, so waiting for them kept stages from ever
    settling. It still counts among the issued, and its next outcome counts when it comes (a
    failure against the threshold at once; a retryable one is waited for, as any retry)."""
    return max(0, stage.notified + stage.updating - stage.rechecked) + stage.retryable


def settle_detail(stage: GateCounts) -> str:
    """What a settling stage waits for, as `waitingFor` says it: "43 of 500 vehicles still
    applying"."""
    applying = max(0, stage.notified + stage.updating - stage.rechecked)
    detail = f"{applying} of {stage.issued} vehicles still applying"
    if stage.retryable:
        detail += f", {stage.retryable} to be retried"
    return detail


def decide(
    *,
    policy: GatePolicy,
    total: GateCounts,
    stage: GateCounts,
    is_canary: bool,
    bake_done: bool,
    acknowledged_failed: int = 0,
    canary_forced: bool = False,
    is_last: bool = False,
) -> GateDecision:
    """One gate decision for a stage being settled or baked (airbyte-style: pure,
    table-tested).

    Order: the failure threshold first (at any time, over every vehicle notified so far);
    then, while the bake is not over, or the stage has vehicles without an outcome (a retry,
    un-settles it), wait; then the canary
    check (canary stage only, once settled and baked); then proceed. A stage is never judged
    on the clock alone: `bake_done` is only true once the stage settled and then baked
    `bakeSeconds`.
    The last stage (`is_last`) waits for the whole rollout to settle (a vehicle of an earlier
    stage retried since): `completed` means every vehicle has an outcome (a blocked one notified
    again may be on its way to its next).

    `acknowledged_failed`: failures an operator accepted by resuming after a FAILURE_THRESHOLD
    pause; they stay in the denominator but no longer count as failures. `canary_forced`: an
    operator resumed with `force` past an unhealthy canary.
    """
    if acknowledged_failed:
        total = total.model_copy(
            update={
                "failed": max(0, total.failed - acknowledged_failed),
                "succeeded": total.succeeded + min(total.failed, acknowledged_failed),
            }
        )
    if failure_threshold_breached(total, max_failure_rate=policy.max_failure_rate):
        return GateDecision(
            action=policy.failure_action,
            reason=StatusReason.FAILURE_THRESHOLD,
            detail=(
                f"{total.failed} of {total.issued} notified vehicles failed"
                f" (more than {policy.max_failure_rate:.0%})"
            ),
        )
    if not bake_done:
        return GateDecision(action=GateAction.WAIT)
    if unsettled(stage):
        return GateDecision(action=GateAction.WAIT, detail=settle_detail(stage))
    if is_last and unsettled(total):
        return GateDecision(action=GateAction.WAIT, detail=f"the rollout: {settle_detail(total)}")
    if (
        is_canary
        and not canary_forced
        and not canary_healthy(
            stage, min_success_rate=policy.min_success_rate, min_samples=policy.min_samples
        )
    ):
        reported = stage.succeeded + stage.failed
        return GateDecision(
            action=GateAction.PAUSE,
            reason=StatusReason.CANARY_UNHEALTHY,
            detail=(
                f"canary: {stage.succeeded} of {reported} reported vehicles ready"
                f" (needs {policy.min_success_rate:.0%} of at least {policy.min_samples})"
            ),
        )
    return GateDecision(action=GateAction.PROCEED)


def sweeps_due(
    last: GateCounts,
    *,
    now: datetime,
    first_issued_at: datetime | None,
    apply_seconds: int,
    rollback: bool = False,
    window_open: bool = True,
) -> list[Sweep]:
    """The sweeps a gate tick runs before it judges, in order, each only when the last counts
    show work for it: apply timeouts once the first issue is `apply_seconds` old and vehicles
    are still applying (a rollback's as soon as returned vehicles are), retries while failed
    vehicles have attempts left, re-checks while vehicles are blocked (not in a rollback).
    Retries and re-checks issue desired states: never while the maintenance window is closed
    (`window_open` False)."""
    applying = last.notified + last.updating > 0
    if rollback:
        return [Sweep.EXPIRE_APPLY_TIMEOUTS] if applying else []
    due = []
    timeouts_due = first_issued_at is not None and now >= first_issued_at + timedelta(
        seconds=apply_seconds
    )
    if timeouts_due and applying:
        due.append(Sweep.EXPIRE_APPLY_TIMEOUTS)
    if last.retryable > 0 and window_open:
        due.append(Sweep.RETRY_FAILED_TARGETS)
    if last.blocked > 0 and window_open:
        due.append(Sweep.RECHECK_BLOCKED)
    return due


# --- Maintenance window --------------------------------------------------------------------
#
# A window opens at `start` (local wall time in `timezone`) on each of its `days` and closes at
# `end`; when end <= start it closes the next day (a window that crosses midnight belongs to
# the day it starts on); start == end is a whole day. No window: always open.


def _hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def _occurrences(
    now_utc: datetime, window: MaintenanceWindowSpec
) -> list[tuple[datetime, datetime]]:
    """The window's (start, end) in UTC for local days from yesterday to a week ahead."""
    zone = ZoneInfo(window.timezone or "UTC")
    days = {d.lower()[:3] for d in window.days}
    start_t, end_t = _hhmm(window.start), _hhmm(window.end)
    today = now_utc.astimezone(zone).date()
    spans = []
    for offset in range(-1, 9):
        day = today + timedelta(days=offset)
        if WEEKDAYS[day.weekday()] not in days:
            continue
        start = datetime.combine(day, start_t, tzinfo=zone)
        end_day = day if end_t > start_t else day + timedelta(days=1)
        end = datetime.combine(end_day, end_t, tzinfo=zone)
        spans.append((start.astimezone(UTC), end.astimezone(UTC)))
    return spans


def window_open(now_utc: datetime, window: MaintenanceWindowSpec | None) -> bool:
    if window is None:
        return True
    return any(start <= now_utc < end for start, end in _occurrences(now_utc, window))


def next_window_start(now_utc: datetime, window: MaintenanceWindowSpec | None) -> datetime | None:
    """`now_utc` when the window is open, else when it next opens (UTC); None when it never
    opens (no days)."""
    if window_open(now_utc, window):
        return now_utc
    assert window is not None
    starts = [start for start, _ in _occurrences(now_utc, window) if start > now_utc]
    return min(starts) if starts else None


# --- Retries -------------------------------------------------------------------------------

# A failed target is issued again (services/rollouts/sweeps.py) when its reason is one of
# these and it has attempts left (it was issued fewer than `retry.maxAttempts` times). Unknown
# codes are not retried (an operator decides); SIGNATURE_INVALID and INSUFFICIENT_STORAGE
# never are.
RETRYABLE_REASONS = frozenset({"NETWORK_UNREACHABLE", "APPLY_FAILED", "APPLY_TIMEOUT"})
MAX_BACKOFF_SECONDS = 6 * 3600


def retry_backoff_seconds(attempt: int, *, base_seconds: int) -> int:
    """Wait before issuing attempt `attempt + 1`: base, 2x base, 4x base, ... capped at 6 h."""
    if base_seconds <= 0:
        return 0
    cap = max(base_seconds, MAX_BACKOFF_SECONDS)
    return int(min(cap, base_seconds * 2 ** max(0, attempt - 1)))


def rollout_policy(
    gates: Mapping[str, Any] | None,
    timeouts: Mapping[str, Any] | None,
    retry: Mapping[str, Any] | None,
) -> RolloutPolicy:
    """The execution settings of a rollout row (camelCase JSON as the API stores it)."""
    gates = gates or {}
    checks = gates.get("safetyChecks") or {}
    window = checks.get("maintenanceWindow")
    timeouts = timeouts or {}
    retry = retry or {}

    def _int(value: Any, default: int) -> int:
        return int(value) if _is_int(value) else default

    return RolloutPolicy(
        gates=gate_policy(gates),
        window=MaintenanceWindowSpec.model_validate(window) if window else None,
        require_stationary=bool(checks.get("requireStationary", DEFAULT_REQUIRE_STATIONARY)),
        min_battery_percent=_int(checks.get("minBatteryPercent"), DEFAULT_MIN_BATTERY_PERCENT),
        apply_seconds=_int(timeouts.get("applySeconds"), DEFAULT_APPLY_SECONDS),
        max_attempts=_int(retry.get("maxAttempts"), DEFAULT_MAX_ATTEMPTS),
        backoff_seconds=_int(retry.get("backoffSeconds"), DEFAULT_BACKOFF_SECONDS),
    )
