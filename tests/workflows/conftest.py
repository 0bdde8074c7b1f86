"""Shared by the workflow tests: the real worker on the time-skipping server, a rollout
started as the API starts it, waiting for a rollout's state, and the rows and outcomes the
gate tests work with (a rollout's vehicles report through `record_target_outcomes`, the
telemetry path's entry point)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from core.db import session_scope
from core.temporal import (
    OUTCOMES_SIGNAL,
    ROLLOUT_WORKFLOW_TYPE,
    initial_search_attributes,
    rollout_workflow_id,
)
from models.workflows import OutcomesSignal, RolloutInput, RolloutResult, RolloutState
from services.rollouts.outcomes import record_target_outcomes
from tests.factories import (
    Sessions,
    fetch_all,
    make_fleet,
    make_release,
    make_rollout,
    stage_vehicles,
    unique_prefix,
)
from worker.main import build_worker

T = TypeVar("T")

RELEASE = "2026.2.0-wf"
HOUR = 3600
GATE_INTERVAL = 600  # fewer ticks than the default 60 s: faster tests, same logic
NEVER_TIMES_OUT = {"applySeconds": 7 * 86400}
# Gates that never stop a rollout whose vehicles report nothing (for tests about sequencing
# and operators).


@pytest.fixture
async def worker(
    time_skipping_env: WorkflowEnvironment, sessions: Sessions, task_queue: str
) -> AsyncIterator[None]:
    """The real worker (workflows, and activities over PostgreSQL) on this test's queue of
    the time-skipping server."""
    async with build_worker(time_skipping_env.client, sessions, task_queue=task_queue):
        yield


async def start_rollout(
    client: Client,
    rollout_id: int,
    *,
    release_version: str,
    task_queue: str,
    correlation_id: str | None = None,
    gate_interval: int | None = None,
    continue_as_new_after: int | None = None,
    workflow_id: str | None = None,
    issue_batch_size: int | None = None,
) -> WorkflowHandle[Any, RolloutResult]:
    """Start `RolloutWorkflow` as the API does (its id, input and initial search attributes);
    the keyword arguments are the test-only knobs of `RolloutInput`."""
    return await client.start_workflow(
        ROLLOUT_WORKFLOW_TYPE,
        RolloutInput(
            rollout_id=rollout_id,
            release_version=release_version,
            correlation_id=correlation_id,
            gate_interval_seconds=gate_interval,
            continue_as_new_after_events=continue_as_new_after,
            issue_batch_size=issue_batch_size,
        ),
        id=workflow_id or rollout_workflow_id(rollout_id),
        task_queue=task_queue,
        result_type=RolloutResult,
        search_attributes=initial_search_attributes(
            rollout_id=rollout_id, release_version=release_version, status="pending"
        ),
    )


class Started(NamedTuple):
    rollout_id: int
    handle: WorkflowHandle[Any, RolloutResult]


StartRollout = Callable[..., Awaitable[Started]]


@pytest.fixture
async def rollout(
    time_skipping_env: WorkflowEnvironment, worker: None, sessions: Sessions, task_queue: str
) -> StartRollout:
    """A factory: a rollout over 60 vehicles of their own (canary 3, waves 50% and 100%, an
    hour's bake each unless `bakes` says otherwise), started on the worker with a gate tick
    every GATE_INTERVAL (`gate_interval=None`: the workflow's own, min(60 s, bake))."""
    await make_release(sessions, version=RELEASE)

    async def start(
        *,
        bakes: tuple[int, int, int] = (HOUR, HOUR, HOUR),
        gates: dict[str, Any] | None = None,
        timeouts: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
        gate_interval: int | None = GATE_INTERVAL,
        issue_batch_size: int | None = None,
        prepare: Callable[[str], Awaitable[None]] | None = None,
        continue_as_new_after: int | None = None,
    ) -> Started:
        prefix = unique_prefix("wf")
        await make_fleet(sessions, prefix=prefix, count=120)
        if prepare is not None:  # the fleet as the test wants it before the rollout starts
            await prepare(prefix)
        rollout_id = await make_rollout(
            sessions,
            release_version=RELEASE,
            targets={"models": [prefix + "m2"]},
            strategy={
                "canary": {"size": 3, "bakeSeconds": bakes[0]},
                "waves": [
                    {"percent": 50, "bakeSeconds": bakes[1]},
                    {"percent": 100, "bakeSeconds": bakes[2]},
                ],
            },
            gates=gates,
            timeouts=timeouts,
            retry=retry,
        )
        handle = await start_rollout(
            time_skipping_env.client,
            rollout_id,
            release_version=RELEASE,
            task_queue=task_queue,
            correlation_id=f"req-{prefix}",
            gate_interval=gate_interval,
            issue_batch_size=issue_batch_size,
            continue_as_new_after=continue_as_new_after,
        )
        return Started(rollout_id, handle)

    return start


# --- Waiting -------------------------------------------------------------------------------


async def eventually(
    read: Callable[[], Awaitable[T]], holds: Callable[[T], bool], *, attempts: int = 300
) -> T:
    """`read()` again every 50 ms until `holds` (at most `attempts` times); what it read."""
    for _ in range(attempts):
        value = await read()
        if holds(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: last read {value}")


async def until(
    handle: WorkflowHandle[Any, Any], holds: Callable[[RolloutState], bool]
) -> RolloutState:
    """The rollout's state (its `progress` query) once `holds`."""
    return await eventually(lambda: handle.query("progress", result_type=RolloutState), holds)


def baking(stage: str) -> Callable[[RolloutState], bool]:
    # Its own bake: the workflow names the next stage before it has issued it.
    return lambda s: (
        s.status == "running"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"bake of {stage} ")
    )


def settling(stage: str) -> Callable[[RolloutState], bool]:
    # Issued, waiting for its vehicles' outcomes.
    return lambda s: (
        s.status == "running"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"settle of {stage}: ")
    )


def rollback_settling(stage: str) -> Callable[[RolloutState], bool]:
    # Its vehicles sent back, waiting for their outcomes.
    return lambda s: (
        s.status == "rolling_back"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"settle of {stage}: ")
    )


def rollback_baking(stage: str) -> Callable[[RolloutState], bool]:
    # The stage's own rollback bake (a stale "rollback bake of <previous stage>" must not count).
    return lambda s: (
        s.status == "rolling_back"
        and s.stage == stage
        and (s.waiting_for or "").startswith(f"rollback bake of {stage} ")
    )


# --- A rollout's vehicles and records ------------------------------------------------------


async def report(
    sessions: Sessions,
    rollout_id: int,
    vehicles: list[str],
    state: str,
    reason: str | None = None,
    *,
    handle: WorkflowHandle[Any, Any] | None = None,
    at: datetime | None = None,
) -> int:
    """The vehicles report `state` (and its reason code), as telemetry would record it; with
    `handle`, the rollout's workflow is then signalled as the ingest path signals it (its
    gates look again at once). `at`: when it happened (default the database's now; the
    time-skipping server's clock is ahead of it). How many targets moved."""
    async with session_scope(sessions) as session:
        moved = await record_target_outcomes(
            session,
            rollout_id=rollout_id,
            outcomes=[(v, state, reason) for v in vehicles],
            at=at,
        )
    if handle is not None and moved:
        await handle.signal(OUTCOMES_SIGNAL, OutcomesSignal(events=moved))
    return moved


@contextlib.asynccontextmanager
async def reporting_fleet(
    sessions: Sessions,
    started: Started,
    *,
    state: str = "succeeded",
    reason: str | None = None,
) -> AsyncIterator[None]:
    """While open, the rollout's vehicles answer: every target notified (by a stage, a retry
    or a rollback) reports `state` at once, and the workflow is signalled, as the ingest path
    does. A fleet that always reports, for tests about sequencing and operators."""

    stop = asyncio.Event()

    async def answer() -> None:
        while not stop.is_set():
            notified = await fetch_all(
                sessions,
                "SELECT vehicle_id FROM rollout_targets WHERE rollout_id = :r"
                " AND state = 'notified'",
                r=started.rollout_id,
            )
            if notified:
                vehicles = [row["vehicle_id"] for row in notified]
                with contextlib.suppress(RPCError):  # the workflow may have finished
                    await report(
                        sessions, started.rollout_id, vehicles, state, reason, handle=started.handle
                    )
            await asyncio.sleep(0.02)

    task = asyncio.create_task(answer())
    try:
        yield
    finally:
        # The flag ends the loop even if a library swallows the cancel (as Python 3.11's
        # wait_for could); the bound turns a stuck answer into an error, not a stalled suite
        # (asyncio.wait, not a timeout around `await task`: that would pass its cancel on to
        # the task and wait again).
        stop.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=30)
        assert task in done, "reporting_fleet's answer loop did not stop within 30 s"
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


async def through_healthy_canary(
    env: WorkflowEnvironment,
    handle: WorkflowHandle[Any, RolloutResult],
    sessions: Sessions,
    rollout_id: int,
) -> list[str]:
    """The canary reports ready, settles and bakes out; returns wave-1's vehicles once wave-1
    is issued (it settles once they report)."""
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary, "succeeded", handle=handle)
    await until(handle, baking("canary"))
    await env.sleep(HOUR + 60)
    await until(handle, settling("wave-1"))
    return await stage_vehicles(sessions, rollout_id, 1)


async def target_states(sessions: Sessions, rollout_id: int) -> list[dict[str, Any]]:
    """Targets per (stage, state, reason_code, attempt)."""
    return await fetch_all(
        sessions,
        "SELECT stage, state, reason_code, attempt, count(*) AS n FROM rollout_targets"
        " WHERE rollout_id = :r GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        r=rollout_id,
    )


async def audit_actions(sessions: Sessions, rollout_id: int) -> list[str]:
    """The rollout's audit actions, in order."""
    rows = await fetch_all(
        sessions,
        "SELECT action FROM audit_log WHERE target_type = 'rollout' AND target_id = :t ORDER BY id",
        t=str(rollout_id),
    )
    return [r["action"] for r in rows]
