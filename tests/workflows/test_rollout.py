"""RolloutWorkflow on the time-skipping server, with the real activities over PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

from core.temporal import (
    ROLLOUT_WORKFLOW_TYPE,
    SA_RELEASE_VERSION,
    SA_ROLLOUT_ID,
    SA_ROLLOUT_STAGE,
    SA_ROLLOUT_STATUS,
    rollout_workflow_id,
)
from models.workflows import RolloutInput, RolloutResult, RolloutSignal, RolloutState
from tests.factories import (
    OLD_RELEASE,
    Sessions,
    fetch_all,
    fetch_one,
    make_fleet,
    make_release,
    make_rollout,
    strategy,
    unique_prefix,
)
from worker.main import build_worker

NEW_RELEASE = "2026.2.0-wf"
HOUR = 3600


@pytest.fixture
async def worker(
    time_skipping_env: WorkflowEnvironment, sessions: Sessions, task_queue: str
) -> AsyncIterator[None]:
    async with build_worker(time_skipping_env.client, sessions, task_queue=task_queue):
        yield


# Gates that never stop a rollout whose vehicles report nothing (these tests are about
# sequencing and operators; test_execution.py covers gates with outcomes).
LENIENT_GATES = {"canaryHealthy": {"minSuccessRate": 0, "minSamples": 0}}
LENIENT_TIMEOUTS = {"applySeconds": 7 * 86400}


@pytest.fixture
async def rollout_id(sessions: Sessions) -> int:
    """A pending rollout over 60 vehicles: canary 3 (1 h bake), waves 50% and 100% (1 h)."""
    prefix = unique_prefix("wf")
    await make_fleet(sessions, prefix=prefix, count=120)
    await make_release(sessions, version=NEW_RELEASE)
    return await make_rollout(
        sessions,
        release_version=NEW_RELEASE,
        targets={"models": [prefix + "m2"]},
        strategy=strategy(
            canary_size=3,
            canary_bake=HOUR,
            waves=[{"percent": 50, "bakeSeconds": HOUR}, {"percent": 100, "bakeSeconds": HOUR}],
        ),
        gates=LENIENT_GATES,
        timeouts=LENIENT_TIMEOUTS,
    )


async def _start(
    env: WorkflowEnvironment, rollout_id: int, task_queue: str
) -> WorkflowHandle[Any, RolloutResult]:
    # As the API starts it.
    return await env.client.start_workflow(
        ROLLOUT_WORKFLOW_TYPE,
        RolloutInput(rollout_id=rollout_id, release_version=NEW_RELEASE, correlation_id="req-1"),
        id=rollout_workflow_id(rollout_id),
        task_queue=task_queue,
        result_type=RolloutResult,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA_ROLLOUT_ID, str(rollout_id)),
                SearchAttributePair(SA_RELEASE_VERSION, NEW_RELEASE),
                SearchAttributePair(SA_ROLLOUT_STATUS, "pending"),
                SearchAttributePair(SA_ROLLOUT_STAGE, ""),
            ]
        ),
    )


async def _until(
    handle: WorkflowHandle[Any, Any], predicate: Callable[[RolloutState], bool]
) -> RolloutState:
    for _ in range(200):
        state = await handle.query("progress", result_type=RolloutState)
        if predicate(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: last state {state}")


def _baking(stage: str) -> Callable[[RolloutState], bool]:
    # Its own bake: the workflow names the next stage before it has issued it.
    return lambda s: s.stage == stage and (s.waiting_for or "").startswith(f"bake of {stage} ")


async def test_canary_and_two_waves_complete(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    rollout_id: int,
    task_queue: str,
    sessions: Sessions,
) -> None:
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    result = await handle.result()  # three one-hour bakes, skipped
    assert result.status == "completed" and result.stages_issued == 3
    assert result.counts.targeted == 60
    assert result.counts.notified == 60 and result.counts.pending == 0

    row = await fetch_one(
        sessions,
        "SELECT status, stage, stage_index, stage_count, targeted, notified, pending,"
        " waiting_for, started_at IS NOT NULL AS started, finished_at IS NOT NULL AS finished"
        " FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert row == {
        "status": "completed",
        "stage": "wave-2",
        "stage_index": 2,
        "stage_count": 3,
        "targeted": 60,
        "notified": 60,
        "pending": 0,
        "waiting_for": None,
        "started": True,
        "finished": True,
    }
    stages = await fetch_all(
        sessions,
        "SELECT stage, state, count(*) AS n FROM rollout_targets WHERE rollout_id = :r"
        " GROUP BY stage, state ORDER BY stage",
        r=rollout_id,
    )
    assert stages == [
        {"stage": 0, "state": "notified", "n": 3},
        {"stage": 1, "state": "notified", "n": 27},
        {"stage": 2, "state": "notified", "n": 30},
    ]
    vehicles = await fetch_all(
        sessions,
        "SELECT v.desired_release_version, count(*) AS n FROM rollout_targets t"
        " JOIN vehicles v ON v.id = t.vehicle_id WHERE t.rollout_id = :r"
        " GROUP BY v.desired_release_version",
        r=rollout_id,
    )
    assert vehicles == [{"desired_release_version": NEW_RELEASE, "n": 60}]
    audit = await fetch_all(
        sessions,
        "SELECT action, payload ->> 'stage' AS stage FROM audit_log"
        " WHERE target_type = 'rollout' AND target_id = :t ORDER BY id",
        t=str(rollout_id),
    )
    assert [(a["action"], a["stage"]) for a in audit] == [
        ("rollout.started", None),
        ("rollout.stage_started", "canary"),
        ("rollout.stage_started", "wave-1"),
        ("rollout.stage_started", "wave-2"),
        ("rollout.completed", "wave-2"),
    ]

    desc = await handle.describe()
    attrs = desc.typed_search_attributes
    assert attrs.get(SA_ROLLOUT_STATUS) == "completed"
    assert attrs.get(SA_ROLLOUT_STAGE) == "wave-2"
    assert attrs.get(SA_ROLLOUT_ID) == str(rollout_id)
    assert attrs.get(SA_RELEASE_VERSION) == NEW_RELEASE

    state = await handle.query("progress", result_type=RolloutState)
    assert state.status == "completed" and not state.paused
    assert [s.name for s in state.stages] == ["canary", "wave-1", "wave-2"]


async def test_pause_holds_the_next_stage_until_resume(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    rollout_id: int,
    task_queue: str,
    sessions: Sessions,
) -> None:
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    await handle.signal("pause", RolloutSignal(reason="investigating", actor="alice"))
    state = await _until(handle, lambda s: s.status == "paused")
    assert state.paused and state.waiting_for == "resume"
    assert (await handle.describe()).typed_search_attributes.get(SA_ROLLOUT_STATUS) == "paused"

    await time_skipping_env.sleep(3 * HOUR)  # well past the canary's bake
    state = await handle.query("progress", result_type=RolloutState)
    assert state.status == "paused" and state.stage == "canary"
    row = await fetch_one(
        sessions,
        "SELECT status, status_reason, notified FROM rollouts WHERE id = :r",
        r=rollout_id,
    )
    assert row == {"status": "paused", "status_reason": "OPERATOR", "notified": 3}

    # A signal without a body works too (as `temporal workflow signal --name resume`).
    await handle.signal("resume")
    result = await handle.result()
    assert result.status == "completed" and result.counts.notified == 60
    audit = await fetch_all(
        sessions,
        "SELECT action, actor, source, reason FROM audit_log"
        " WHERE target_type = 'rollout' AND target_id = :t AND action IN"
        " ('rollout.paused', 'rollout.resumed') ORDER BY id",
        t=str(rollout_id),
    )
    assert audit == [
        {
            "action": "rollout.paused",
            "actor": "alice",
            "source": "temporal",
            "reason": "investigating",
        },
        {"action": "rollout.resumed", "actor": "temporal", "source": "temporal", "reason": None},
    ]


async def test_abort_stops_before_the_next_stage(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    rollout_id: int,
    task_queue: str,
    sessions: Sessions,
) -> None:
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    await handle.signal("abort", RolloutSignal(reason="bad build", actor="bob"))
    result = await handle.result()
    assert result.status == "aborted" and result.status_reason == "OPERATOR"
    assert result.counts.notified == 3 and result.counts.pending == 0
    states = await fetch_all(
        sessions,
        "SELECT state, count(*) AS n FROM rollout_targets WHERE rollout_id = :r"
        " GROUP BY state ORDER BY state",
        r=rollout_id,
    )
    assert states == [{"state": "notified", "n": 3}, {"state": "skipped", "n": 57}]
    untouched = await fetch_one(
        sessions,
        "SELECT count(*) AS n FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r AND t.state = 'skipped'"
        " AND v.desired_release_version = :old",
        r=rollout_id,
        old=OLD_RELEASE,
    )
    assert untouched["n"] == 57
    assert (await handle.describe()).typed_search_attributes.get(SA_ROLLOUT_STATUS) == "aborted"
    last = await fetch_one(
        sessions,
        "SELECT action, actor, reason FROM audit_log WHERE target_type = 'rollout'"
        " AND target_id = :t ORDER BY id DESC LIMIT 1",
        t=str(rollout_id),
    )
    assert last == {"action": "rollout.aborted", "actor": "bob", "reason": "bad build"}


async def test_rollback_returns_the_touched_vehicles(
    time_skipping_env: WorkflowEnvironment,
    worker: None,
    rollout_id: int,
    task_queue: str,
    sessions: Sessions,
) -> None:
    handle = await _start(time_skipping_env, rollout_id, task_queue)
    await _until(handle, _baking("canary"))
    # Time skips only when asked while nobody waits. Half a gate tick past the canary's bake:
    # the signal below must not land on the instant a tick timer fires (a signal and a timer
    # at the same virtual instant have been seen to wedge the time-skipping test server).
    await time_skipping_env.sleep(HOUR + 30)
    await _until(handle, _baking("wave-1"))
    await handle.signal("rollback", RolloutSignal(reason="regression", actor="carol"))
    result = await handle.result()
    assert result.status == "rolled_back"
    states = await fetch_all(
        sessions,
        "SELECT t.state, v.desired_release_version AS desired, count(*) AS n"
        " FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE t.rollout_id = :r GROUP BY 1, 2 ORDER BY 1",
        r=rollout_id,
    )
    assert states == [
        {"state": "rolled_back", "desired": OLD_RELEASE, "n": 30},
        {"state": "skipped", "desired": OLD_RELEASE, "n": 30},
    ]
