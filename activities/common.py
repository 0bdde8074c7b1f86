"""What every activity shares: how a domain failure reaches the workflow, and where a retried
attempt resumes."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.errors import MotorcadeError

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


def domain_failures(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """An error of the tree (`core/errors.py`) ends the activity with a non-retryable
    `ApplicationError` whose type is the error's class name (`RolloutNotFound`), unless the
    error is `retryable` (then the attempt fails and Temporal retries it). Anything else is a
    bug and stays one: it fails the attempt as it is, and Temporal retries it."""

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except MotorcadeError as exc:
            if exc.retryable:
                raise
            raise ApplicationError(
                exc.message, type=type(exc).__name__, non_retryable=True
            ) from exc

    return run


def resumed_progress(model: type[M]) -> M:
    """The progress a previous attempt heartbeated (`model`, from plain JSON), or a fresh one
    when there is none or it is unreadable (safe: every batch is idempotent)."""
    details: Any = activity.info().heartbeat_details
    if details:
        try:
            return model.model_validate(details[0])
        except ValueError:
            pass
    return model()
