"""`ReconcileWorkflow`: the periodic reconcile (SPEC.md, Temporal), started by the Temporal
Schedule `motorcade-reconcile` (worker/schedules.py) on `motorcade-rollouts`.

Marks vehicles offline that sent no heartbeat for `offline_after_seconds`, notifies the
blocked vehicles of completed rollouts whose last heartbeat now passes their rollout's safety
checks (inside its maintenance window), then records the fleet's desired-vs-actual drift as
one reconcile run. The activities work in PostgreSQL and return counts; the history is a
handful of events per run.

Then it starts the workflow of every `pending` rollout older than `start_grace_seconds`
(MOTORCADE_ROLLOUT_START_GRACE_SECONDS) whose workflow does not exist: the API's own start
failed, timed out, or the API died between its commit and the start. The run's audit entry
(`fleet.reconciled`) is written only when the run changed something.

The blocked re-check and the pending start came later: runs started before them replay
without them (`workflow.patched(BLOCKED_RECHECK_PATCH)`, `workflow.patched(
START_PENDING_PATCH)`; tests/workflows/histories/reconcile/).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import ReconcileActivities
    from core.temporal import RECONCILE_WORKFLOW_TYPE
    from models.workflows import (
        MarkOfflineInput,
        RecheckCompletedInput,
        ReconcileInput,
        ReconcileResult,
        RecordDriftInput,
        StartPendingInput,
    )

# An attempt whose answer is lost (Temporal restarted while it ran) is retried only after its
# heartbeat or start-to-close timeout, and the schedule's overlap policy (SKIP) starts no
# other run meanwhile: short ones keep the reconcile (and the pending rollouts it starts)
# within a minute of Temporal's return, as docs/operations.md says. The batch activities
# heartbeat once per batch, far more often than 30 s.
MARK_OFFLINE_TIMEOUT = timedelta(minutes=10)
MARK_OFFLINE_HEARTBEAT = timedelta(seconds=30)
RECORD_DRIFT_TIMEOUT = timedelta(seconds=60)
RECHECK_BLOCKED_TIMEOUT = timedelta(minutes=10)
RECHECK_BLOCKED_HEARTBEAT = timedelta(seconds=30)
BLOCKED_RECHECK_PATCH = "reconcile-recheck-blocked-of-completed-rollouts"
START_PENDING_PATCH = "reconcile-start-pending-rollouts"
START_PENDING_TIMEOUT = timedelta(minutes=5)
START_PENDING_HEARTBEAT = timedelta(seconds=30)
# Its activities are retried less long than a rollout's (workflows/steps.py): the next
# scheduled run comes within minutes anyway.
RECONCILE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)


def run_key_of(info: workflow.Info, input: ReconcileInput) -> str:
    """The run's idempotency key: given, or the workflow id (the schedule makes it distinct per
    slot) with the workflow's start time (so an ad-hoc run that reuses an id is a new run)."""
    if input.run_key:
        return input.run_key
    started = info.workflow_start_time.isoformat().replace("+00:00", "Z")
    return f"{info.workflow_id}@{started}"


@workflow.defn(name=RECONCILE_WORKFLOW_TYPE)
class ReconcileWorkflow:
    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileResult:
        run_key = run_key_of(workflow.info(), input)
        cutoff = workflow.now() - timedelta(seconds=input.offline_after_seconds)
        workflow.set_current_details(f"marking vehicles unseen since {cutoff.isoformat()}")
        offline = await workflow.execute_activity_method(
            ReconcileActivities.mark_offline_vehicles,
            MarkOfflineInput(cutoff=cutoff, batch_size=input.batch_size),
            start_to_close_timeout=MARK_OFFLINE_TIMEOUT,
            heartbeat_timeout=MARK_OFFLINE_HEARTBEAT,
            retry_policy=RECONCILE_RETRY,
        )
        rechecked = started = refused = 0
        if workflow.patched(BLOCKED_RECHECK_PATCH):
            workflow.set_current_details("re-checking the blocked vehicles of completed rollouts")
            recheck = await workflow.execute_activity_method(
                ReconcileActivities.recheck_completed_rollouts,
                RecheckCompletedInput(
                    now=workflow.now(),
                    offline_after_seconds=input.offline_after_seconds,
                ),
                start_to_close_timeout=RECHECK_BLOCKED_TIMEOUT,
                heartbeat_timeout=RECHECK_BLOCKED_HEARTBEAT,
                retry_policy=RECONCILE_RETRY,
            )
            rechecked = recheck.changed
        if workflow.patched(START_PENDING_PATCH):
            grace = timedelta(seconds=input.start_grace_seconds)
            workflow.set_current_details("starting pending rollouts whose workflow did not start")
            pending = await workflow.execute_activity_method(
                ReconcileActivities.start_pending_rollouts,
                StartPendingInput(created_before=workflow.now() - grace),
                start_to_close_timeout=START_PENDING_TIMEOUT,
                heartbeat_timeout=START_PENDING_HEARTBEAT,
                retry_policy=RECONCILE_RETRY,
            )
            started, refused = pending.started, pending.refused
        workflow.set_current_details(f"recording drift ({offline.marked} marked offline)")
        drift = await workflow.execute_activity_method(
            ReconcileActivities.record_reconcile_drift,
            RecordDriftInput(
                run_key=run_key,
                marked_offline=offline.marked,
                cutoff=cutoff,
                rechecked=rechecked,
                started_rollouts=started,
                refused_rollouts=refused,
            ),
            start_to_close_timeout=RECORD_DRIFT_TIMEOUT,
            retry_policy=RECONCILE_RETRY,
        )
        workflow.set_current_details(
            f"done: {offline.marked} marked offline, {drift.drifted} vehicles drifted"
        )
        return ReconcileResult(
            run_id=drift.run_id,
            run_key=drift.run_key,
            marked_offline=offline.marked,
            drifted=drift.drifted,
        )
