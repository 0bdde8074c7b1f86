"""Every default value, in one place: the API's request models, the settings, the workflow and
activity payloads, the pure rules and the services read them from here, so a default is
changed once."""

from __future__ import annotations

from typing import Literal

# What a breached failure threshold does (`gates.failureThreshold.action`).
FailureAction = Literal["pause", "rollback"]

# --- A rollout's gates, timeouts and retries (SPEC.md) ---------------------------------------
DEFAULT_MIN_SUCCESS_RATE = 0.95  # gates.canaryHealthy.minSuccessRate
DEFAULT_MIN_SAMPLES = 1  # gates.canaryHealthy.minSamples
DEFAULT_MAX_FAILURE_RATE = 0.05  # gates.failureThreshold.maxFailureRate
DEFAULT_FAILURE_ACTION: FailureAction = "pause"  # gates.failureThreshold.action
DEFAULT_APPLY_SECONDS = 3600  # timeouts.applySeconds
DEFAULT_MAX_ATTEMPTS = 2  # retry.maxAttempts
DEFAULT_BACKOFF_SECONDS = 300  # retry.backoffSeconds

# --- The fleet's safety defaults (MOTORCADE_SAFETY_*); also gates.safetyChecks when a stored
# rollout lacks them (the API stores the effective checks in every rollout).
DEFAULT_REQUIRE_STATIONARY = True
DEFAULT_MIN_BATTERY_PERCENT = 30

# --- Vehicles and telemetry (MOTORCADE_* settings of the same names) --------------------------
DEFAULT_OFFLINE_AFTER_SECONDS = 300  # no heartbeat this long: offline
DEFAULT_TELEMETRY_REFRESH_SECONDS = 240  # a heartbeat rewrites lastSeenAt at most this often
DEFAULT_TELEMETRY_BATTERY_STEP = 5  # battery points that reach the wide row at once
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 300  # a sentAt/occurredAt further in the future: refused
DEFAULT_MAX_SEQ_JUMP = 1_000_000  # a seq further past the newest stored (same epoch): refused
DEFAULT_INGEST_QUEUE_MAX_ITEMS = 50_000
DEFAULT_INGEST_GROUP_MAX_ITEMS = 10_000
DEFAULT_INGEST_GROUP_WAIT_MS = 2.0
DEFAULT_INGEST_WRITERS = 1
DEFAULT_TELEMETRY_MAX_BODY_BYTES = 1024 * 1024  # one POST /telemetry body

# --- Batches: rows one transaction moves -------------------------------------------------
ISSUE_BATCH_SIZE = 5000  # targets a stage issues (or a rollback stage returns)
SWEEP_BATCH_SIZE = 1000  # targets a sweep (timeouts, retries, blocked re-checks) moves
OFFLINE_BATCH_SIZE = 10_000  # vehicles the reconcile marks offline

# A `pending` rollout this old whose workflow does not exist is started by the reconcile
# (MOTORCADE_ROLLOUT_START_GRACE_SECONDS).
DEFAULT_ROLLOUT_START_GRACE_SECONDS = 30
# Pending rollouts read per statement by the reconcile's start pass (keyset on id).
PENDING_START_BATCH_SIZE = 100
