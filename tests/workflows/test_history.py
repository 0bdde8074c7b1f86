"""Bounded history: a 10,000-vehicle rollout's history is as long as a 100-vehicle one's, and
continue-as-new carries the state; saved histories of real runs replay with the current code
(a change that would break running workflows fails here first).

`rollout_before_settling_*.json` are runs of the workflow as it was before stages settled
(commit e5887ac: issue, then bake; a refused signal only logged): they replay through the
`settle-before-bake` patch's old branch, as rollouts started before that change and still
running do.

Record the saved histories again (after an intended, versioned change) with
`MOTORCADE_RECORD_HISTORIES=1 pytest tests/workflows/test_history.py`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from core.temporal import SA_ROLLOUT_STATUS
from models.workflows import RolloutResult, RolloutSignal, RolloutState
from tests.factories import LENIENT_GATES, Sessions, fleet_rollout, stage_vehicles
from tests.workflows.conftest import (
    HOUR,
    NEVER_TIMES_OUT,
    Started,
    StartRollout,
    report,
    reporting_fleet,
    settling,
    start_rollout,
    until,
)
from workflows.rollout import RolloutWorkflow

RELEASE = "2026.2.0-hist"
HISTORIES = Path(__file__).parent / "histories"


async def _run(
    env: WorkflowEnvironment,
    sessions: Sessions,
    task_queue: str,
    *,
    vehicles: int,
    can_after: int | None = None,
    gate_interval: int | None = None,
    during: Callable[[WorkflowHandle[Any, RolloutResult]], Awaitable[None]] | None = None,
) -> tuple[WorkflowHandle[Any, RolloutResult], RolloutResult, int]:
    rollout_id, _ = await fleet_rollout(
        sessions,
        name="hs",
        vehicles=vehicles,
        release=RELEASE,
        models=("m1", "m2"),
        strategy={
            "canary": {"percent": 1, "bakeSeconds": HOUR},
            "waves": [
                {"percent": 10, "bakeSeconds": HOUR},
                {"percent": 50, "bakeSeconds": HOUR},
                {"percent": 100, "bakeSeconds": HOUR},
            ],
        },
        gates=LENIENT_GATES,
        timeouts=NEVER_TIMES_OUT,
    )
    handle = await start_rollout(
        env.client,
        rollout_id,
        release_version=RELEASE,
        task_queue=task_queue,
        gate_interval=gate_interval,
        continue_as_new_after=can_after,
    )
    async with reporting_fleet(sessions, Started(rollout_id, handle)):
        if during is not None:
            await during(handle)
        result = await handle.result()
    history = await handle.fetch_history()
    return handle, result, len(history.events)


async def test_history_length_does_not_grow_with_the_fleet(
    time_skipping_env: WorkflowEnvironment, worker: None, sessions: Sessions, task_queue: str
) -> None:
    _, small, small_events = await _run(
        time_skipping_env, sessions, task_queue, vehicles=100, gate_interval=300
    )
    _, large, large_events = await _run(
        time_skipping_env, sessions, task_queue, vehicles=10_000, gate_interval=300
    )
    assert small.status == large.status == "completed"
    assert (small.counts.notified, large.counts.notified) == (100, 10_000)
    # Same order of length, not 100 times longer: the large one issues in more batches inside
    # one activity, and its vehicles take longer to report (each stage settles when they
    # have), so the time-skipping server fits a few more gate ticks in while it waits.
    assert large_events <= small_events * 2, (small_events, large_events)
    assert large_events < 10_240


async def test_continue_as_new_carries_the_state(
    time_skipping_env: WorkflowEnvironment, worker: None, sessions: Sessions, task_queue: str
) -> None:
    handle, result, last_run_events = await _run(
        time_skipping_env, sessions, task_queue, vehicles=200, can_after=60, gate_interval=600
    )
    assert result.status == "completed" and result.counts.notified == 200
    assert result.stages_issued == 4
    state = await handle.query("progress", result_type=RolloutState)
    assert state.runs > 2 and state.current_stage == 4
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(SA_ROLLOUT_STATUS) == "completed"
    assert last_run_events < 100
    if os.environ.get("MOTORCADE_RECORD_HISTORIES"):
        HISTORIES.mkdir(exist_ok=True)
        history = await handle.fetch_history()
        (HISTORIES / "rollout_continued_as_new.json").write_text(history.to_json())


async def test_a_run_with_signals_replays_and_is_saved(
    time_skipping_env: WorkflowEnvironment, worker: None, sessions: Sessions, task_queue: str
) -> None:
    """A real run (pause and resume by signal while the canary bakes) replays with the current
    code; with MOTORCADE_RECORD_HISTORIES=1 it is saved for test_saved_histories_replay."""

    async def pause_and_resume(handle: WorkflowHandle[Any, RolloutResult]) -> None:
        await until(handle, lambda s: (s.waiting_for or "").startswith("bake"))
        await handle.signal("pause", RolloutSignal(reason="replay test", actor="alice"))
        await until(handle, lambda s: s.status == "paused")
        await handle.signal("resume", RolloutSignal(reason="go on", actor="alice"))

    handle, result, _ = await _run(
        time_skipping_env,
        sessions,
        task_queue,
        vehicles=100,
        gate_interval=1800,
        during=pause_and_resume,
    )
    assert result.status == "completed"
    await _save(handle, "rollout_paused_resumed.json")


async def _save(handle: WorkflowHandle[Any, RolloutResult], name: str) -> None:
    """Replay the run with the current code; with MOTORCADE_RECORD_HISTORIES=1 save it."""
    history = await handle.fetch_history()
    replayer = Replayer(workflows=[RolloutWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
    if os.environ.get("MOTORCADE_RECORD_HISTORIES"):
        HISTORIES.mkdir(exist_ok=True)
        (HISTORIES / name).write_text(history.to_json())


async def test_an_event_driven_pause_replays_and_is_saved(
    rollout: StartRollout, sessions: Sessions
) -> None:
    """The canary's vehicles fail: the `outcomes` signal pauses the rollout while it settles
    (FAILURE_THRESHOLD), then an operator aborts it."""
    rollout_id, handle = await rollout(timeouts=NEVER_TIMES_OUT)
    await until(handle, settling("canary"))
    canary = await stage_vehicles(sessions, rollout_id, 0)
    await report(sessions, rollout_id, canary[:2], "failed", "SIGNATURE_INVALID", handle=handle)
    state = await until(handle, lambda s: s.status == "paused")
    assert state.status_reason == "FAILURE_THRESHOLD" and state.outcome_signals >= 1
    await handle.signal("abort", RolloutSignal(reason="replay test", actor="alice"))
    assert (await handle.result()).status == "aborted"
    await _save(handle, "rollout_failure_paused.json")


async def test_a_staged_rollback_replays_and_is_saved(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    """Every vehicle reports at once; an operator rolls back while wave-1 bakes: each stage's
    rollback issues, settles and bakes."""
    started = await rollout(gates=LENIENT_GATES, timeouts=NEVER_TIMES_OUT)
    handle = started.handle
    async with reporting_fleet(sessions, started):
        await until(handle, lambda s: (s.waiting_for or "").startswith("bake of canary"))
        await time_skipping_env.sleep(HOUR + 60)
        await until(handle, lambda s: (s.waiting_for or "").startswith("bake of wave-1"))
        await handle.signal("rollback", RolloutSignal(reason="replay test", actor="carol"))
        result = await handle.result()
    assert result.status == "rolled_back"
    await _save(handle, "rollout_rolled_back.json")


async def test_a_run_with_refused_signals_replays(
    time_skipping_env: WorkflowEnvironment, worker: None, sessions: Sessions, task_queue: str
) -> None:
    """Refused signals (audited by an activity the main flow schedules when it wakes) replay
    with the current code: while baking, and while paused."""

    async def refused_while_baking_and_paused(handle: WorkflowHandle[Any, RolloutResult]) -> None:
        await until(handle, lambda s: (s.waiting_for or "").startswith("bake"))
        await handle.signal("resume", RolloutSignal(reason="too early", actor="alice"))
        await until(handle, lambda s: s.control_seq == 1 and not s.pending_refusals)
        await handle.signal("pause", RolloutSignal(reason="look", actor="alice"))
        await until(handle, lambda s: s.status == "paused")
        await handle.signal("pause", RolloutSignal(reason="again", actor="alice"))
        await until(handle, lambda s: s.control_seq == 3 and not s.pending_refusals)
        await handle.signal("resume", RolloutSignal(reason="go on", actor="alice"))

    handle, result, _ = await _run(
        time_skipping_env,
        sessions,
        task_queue,
        vehicles=100,
        gate_interval=1800,
        during=refused_while_baking_and_paused,
    )
    assert result.status == "completed"
    history = await handle.fetch_history()
    audits = [
        e
        for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name
        == "record_control_refusals"
    ]
    assert len(audits) == 2
    replayer = Replayer(workflows=[RolloutWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


# Read at collection time (plain files, small).
SAVED = {path.name: path.read_text() for path in sorted(HISTORIES.glob("*.json"))}


@pytest.mark.parametrize("name", sorted(SAVED))
async def test_saved_histories_replay(name: str) -> None:
    replayer = Replayer(workflows=[RolloutWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(WorkflowHistory.from_json(name, SAVED[name]))
