"""Payloads of the reconcile's safety pass (`ReconcileActivities.recheck_completed_rollouts`):
the blocked vehicles of completed rollouts are notified once a heartbeat passes their
rollout's checks (SPEC.md, Rollouts). Counts only: the vehicles stay in PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from models.defaults import DEFAULT_OFFLINE_AFTER_SECONDS, SWEEP_BATCH_SIZE


class RecheckCompletedInput(BaseModel):
    # The workflow's time: whether each rollout's maintenance window is open, and the
    # `notified_at` of the targets notified.
    now: datetime
    # How old a heartbeat the checks still trust (the reconcile's offline cutoff age).
    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    batch_size: int = SWEEP_BATCH_SIZE


class RecheckCompletedResult(BaseModel):
    # Completed rollouts with blocked targets, and those of them left alone because their
    # maintenance window is closed.
    rollouts: int = 0
    outside_window: int = 0
    # Targets moved: notified, their reason code changed, or skipped (superseded).
    changed: int = 0
