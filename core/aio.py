"""asyncio helpers that stay cancellable.

Never `asyncio.wait_for` in this code base: on Python 3.11 it can swallow a cancellation that
arrives in the same loop iteration as the awaited thing completes (python/cpython#86296,
fixed by 3.12's rewrite on `asyncio.timeout`). A background loop waiting on an event with it
then never stops, and neither does the shutdown that cancelled it (seen: the stream hub's
reader kept polling after `StreamHub.stop`, and the API's lifespan hung). `asyncio.timeout`
tells its own expiry from a caller's cancel; tests/test_architecture.py keeps `wait_for` out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

# How long one step of a process's shutdown may take (stop the stream hub, drain the ingest
# queue, dispose of the database pool, ...) before it is left behind.
SHUTDOWN_STEP_SECONDS = 10.0


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until `event` is set or `seconds` pass (None: no limit); whether it is set. A
    cancellation of the caller always propagates."""
    if seconds is None:
        await event.wait()
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def stop_within(
    step: str, stop: Callable[[], Awaitable[object]], seconds: float = SHUTDOWN_STEP_SECONDS
) -> bool:
    """Run one shutdown step for at most `seconds`; whether it finished. One that takes longer
    is cancelled, not awaited, and logged by name (`shutdown step did not finish`): the
    process still stops, and says which part hung. One that fails is logged and passed over,
    so the steps after it still run."""
    # A logger per call, not one cached at import: the configuration of the moment applies.
    log = structlog.stdlib.get_logger("motorcade.shutdown")
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.error("shutdown step did not finish", step=step, seconds=seconds)
        return False
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("shutdown step failed", step=step, exc_info=exc)
    return True
