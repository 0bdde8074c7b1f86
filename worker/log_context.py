"""Activity log context: every log line an activity writes carries the workflow id, the
activity type and attempt and, when the activity's input has one, the correlation id (the
`X-Request-ID` of the request that caused it)."""

from __future__ import annotations

from typing import Any

import structlog
from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)


class _ActivityLogContext(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        bound: dict[str, Any] = {
            "workflow_id": info.workflow_id,
            "activity": info.activity_type,
            "attempt": info.attempt,
        }
        for arg in input.args:
            correlation_id = getattr(arg, "correlation_id", None)
            if correlation_id:
                bound["correlation_id"] = correlation_id
                break
        with structlog.contextvars.bound_contextvars(**bound):
            return await super().execute_activity(input)


class LogContextInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityLogContext(next)
