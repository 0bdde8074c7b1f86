"""The retry rule as production runs it: the retry sweep's SQL (`sweeps.retry_failed_targets`)
and the gate counts' `retryable` (`outcomes.gate_counts`), over real rows. A target failed for
a retryable reason (`policy.RETRYABLE_REASONS`) is issued again while it has attempts left,
once its backoff (`policy.retry_backoff_seconds` of the attempt that failed) is over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core.db import session_scope
from services.rollouts import issue, outcomes, plan, sweeps
from tests.factories import (
    Sessions,
    fetch_one,
    fleet_rollout,
    strategy,
)

RELEASE = "2026.2.0-retry"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


async def _failed_target(
    sessions: Sessions, *, reason: str | None, attempt: int, failed_at: datetime
) -> tuple[int, str]:
    """A rollout of one vehicle, issued, whose target then failed with `reason` on its
    `attempt`-th issue at `failed_at`."""
    rollout_id, prefix = await fleet_rollout(
        sessions,
        name="retry",
        vehicles=1,
        release=RELEASE,
        strategy=strategy(canary_size=None, waves=[{"percent": 100}]),
        models=(),
        regions=("eu-west",),
    )
    async with session_scope(sessions) as session:
        await plan.plan_and_expand(session, rollout_id=rollout_id)
        await issue.issue_stage_batch(
            session, rollout_id=rollout_id, stage_index=0, release_version=RELEASE
        )
        await (await session.connection()).execute(
            text(
                "UPDATE rollout_targets SET state = 'failed', reason_code = :reason,"
                " attempt = :attempt, updated_at = :at WHERE rollout_id = :r"
            ),
            {"reason": reason, "attempt": attempt, "at": failed_at, "r": rollout_id},
        )
    return rollout_id, prefix + "0000000"


async def _retry(sessions: Sessions, rollout_id: int, *, max_attempts: int, base: int) -> int:
    async with session_scope(sessions) as session:
        batch = await sweeps.retry_failed_targets(
            session,
            rollout_id=rollout_id,
            release_version=RELEASE,
            now=NOW,
            max_attempts=max_attempts,
            backoff_seconds=base,
        )
    return batch.changed


@pytest.mark.parametrize(
    ("reason", "attempt", "max_attempts", "retried"),
    [
        ("NETWORK_UNREACHABLE", 1, 2, True),
        ("APPLY_FAILED", 1, 2, True),
        ("APPLY_TIMEOUT", 1, 3, True),
        ("APPLY_TIMEOUT", 2, 2, False),  # attempts used up
        ("SIGNATURE_INVALID", 1, 5, False),
        ("INSUFFICIENT_STORAGE", 1, 5, False),
        ("BATTERY_LOW", 1, 5, False),  # a safety block, not a failure to retry
        ("SOMETHING_NEW", 1, 5, False),  # unknown: an operator decides
        (None, 1, 5, False),
    ],
)
async def test_which_failures_are_retried(
    sessions: Sessions, reason: str | None, attempt: int, max_attempts: int, retried: bool
) -> None:
    rollout_id, vehicle = await _failed_target(
        sessions, reason=reason, attempt=attempt, failed_at=NOW - timedelta(days=2)
    )
    async with session_scope(sessions) as session:
        counts = await outcomes.gate_counts(
            session, rollout_id=rollout_id, stage_index=None, max_attempts=max_attempts
        )
    assert (counts.failed, counts.retryable) == (1, int(retried))
    assert await _retry(sessions, rollout_id, max_attempts=max_attempts, base=0) == int(retried)
    target = await fetch_one(
        sessions,
        "SELECT state, attempt FROM rollout_targets WHERE rollout_id = :r AND vehicle_id = :v",
        r=rollout_id,
        v=vehicle,
    )
    assert target == (
        {"state": "notified", "attempt": attempt + 1}
        if retried
        else {"state": "failed", "attempt": attempt}
    )


@pytest.mark.parametrize(
    ("attempt", "base", "wait"),
    [(1, 300, 300), (2, 300, 600), (3, 300, 1200), (10, 300, 21600), (3, 86400, 86400)],
)
async def test_a_retry_waits_out_its_backoff(
    sessions: Sessions, attempt: int, base: int, wait: int
) -> None:
    """Failed `wait - 1` seconds ago: not yet; `wait` seconds ago: issued again."""
    for ago, retried in ((wait - 1, False), (wait, True)):
        rollout_id, _ = await _failed_target(
            sessions,
            reason="APPLY_FAILED",
            attempt=attempt,
            failed_at=NOW - timedelta(seconds=ago),
        )
        assert await _retry(sessions, rollout_id, max_attempts=11, base=base) == int(retried)
