"""`RetentionWorkflow`: the periodic retention purge, started by the Temporal Schedule
`motorcade-retention` (worker/schedules.py) on `motorcade-rollouts`.

Deletes, past their retention, the change feed's rows (`change_feed_hours`), the vehicle
timeline's events (`timeline_days`, 0: keep) and the audit log's entries (`audit_days`, 0:
keep), each by one activity that works in bounded batches and returns counts: a run's history
is a handful of events whatever the backlog (a backlog larger than `max_batches` batches is
worked off over the next runs). The cutoffs are the workflow's time minus each retention.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.retention import RetentionActivities
    from core.temporal import RETENTION_WORKFLOW_TYPE
    from models.workflows import PurgeInput, RetentionInput, RetentionResult

PURGE_TIMEOUT = timedelta(minutes=20)
PURGE_HEARTBEAT = timedelta(minutes=1)
# The next scheduled run comes within the hour anyway.
RETENTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=5,
)


@workflow.defn(name=RETENTION_WORKFLOW_TYPE)
class RetentionWorkflow:
    @workflow.run
    async def run(self, input: RetentionInput) -> RetentionResult:
        now = workflow.now()

        def purge(days: float) -> PurgeInput:
            return PurgeInput(
                cutoff=now - timedelta(days=days),
                batch_size=input.batch_size,
                max_batches=input.max_batches,
            )

        options: dict = {
            "start_to_close_timeout": PURGE_TIMEOUT,
            "heartbeat_timeout": PURGE_HEARTBEAT,
            "retry_policy": RETENTION_RETRY,
        }
        workflow.set_current_details("purging the change feed")
        result = RetentionResult(
            change_feed=await workflow.execute_activity_method(
                RetentionActivities.purge_change_feed,
                purge(input.change_feed_hours / 24),
                **options,
            )
        )
        if input.timeline_days > 0:
            workflow.set_current_details("purging timeline events")
            result.timeline = await workflow.execute_activity_method(
                RetentionActivities.purge_timeline, purge(input.timeline_days), **options
            )
        if input.audit_days > 0:
            workflow.set_current_details("purging audit entries")
            result.audit = await workflow.execute_activity_method(
                RetentionActivities.purge_audit_log, purge(input.audit_days), **options
            )
        workflow.set_current_details("done")
        return result
