"""RolloutWorkflow on the time-skipping server, with the real activities over PostgreSQL:
sequencing and operators' signals (every vehicle reports `ready` as soon as it is notified;
gates never stop these rollouts)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from core.temporal import SA_RELEASE_VERSION, SA_ROLLOUT_ID, SA_ROLLOUT_STAGE, SA_ROLLOUT_STATUS
from models.workflows import RolloutSignal, RolloutState
from tests.factories import LENIENT_GATES, OLD_RELEASE, Sessions, fetch_all, fetch_one
from tests.workflows.conftest import (
    HOUR,
    NEVER_TIMES_OUT,
    RELEASE,
    Started,
    StartRollout,
    baking,
    eventually,
    reporting_fleet,
    until,
)


@contextlib.asynccontextmanager
async def lenient(rollout: StartRollout, sessions: Sessions) -> AsyncIterator[Started]:
    """Canary 3, waves to 30 and 60 vehicles, an hour's bake each, the workflow's own gate
    tick (min(60 s, bake)), a fleet that reports `ready` at once; only an operator stops it."""
    started = await rollout(gates=LENIENT_GATES, timeouts=NEVER_TIMES_OUT, gate_interval=None)
    async with reporting_fleet(sessions, started):
        yield started


async def _search_attributes(handle: WorkflowHandle[Any, Any]) -> dict[str, Any]:
    attrs = (await handle.describe()).typed_search_attributes
    keys = (SA_ROLLOUT_STATUS, SA_ROLLOUT_STAGE, SA_ROLLOUT_ID, SA_RELEASE_VERSION)
    return {key.name: attrs.get(key) for key in keys}


async def test_canary_and_two_waves_complete(rollout: StartRollout, sessions: Sessions) -> None:
    async with lenient(rollout, sessions) as (rollout_id, handle):
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
            {"stage": 0, "state": "succeeded", "n": 3},
            {"stage": 1, "state": "succeeded", "n": 27},
            {"stage": 2, "state": "succeeded", "n": 30},
        ]
        vehicles = await fetch_all(
            sessions,
            "SELECT v.desired_release_version, count(*) AS n FROM rollout_targets t"
            " JOIN vehicles v ON v.id = t.vehicle_id WHERE t.rollout_id = :r"
            " GROUP BY v.desired_release_version",
            r=rollout_id,
        )
        assert vehicles == [{"desired_release_version": RELEASE, "n": 60}]
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
        assert await _search_attributes(handle) == {
            "RolloutStatus": "completed",
            "RolloutStage": "wave-2",
            "RolloutId": str(rollout_id),
            "ReleaseVersion": RELEASE,
        }
        state = await handle.query("progress", result_type=RolloutState)
        assert state.status == "completed" and not state.paused
        assert [s.name for s in state.stages] == ["canary", "wave-1", "wave-2"]


async def test_pause_holds_the_next_stage_until_resume(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    async with lenient(rollout, sessions) as (rollout_id, handle):
        await until(handle, baking("canary"))
        await handle.signal("pause", RolloutSignal(reason="investigating", actor="alice"))
        state = await until(handle, lambda s: s.status == "paused")
        assert state.paused and state.waiting_for == "resume"
        assert (await _search_attributes(handle))["RolloutStatus"] == "paused"

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
            {
                "action": "rollout.resumed",
                "actor": "temporal",
                "source": "temporal",
                "reason": None,
            },
        ]


async def test_abort_stops_before_the_next_stage(rollout: StartRollout, sessions: Sessions) -> None:
    async with lenient(rollout, sessions) as (rollout_id, handle):
        await until(handle, baking("canary"))
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
        assert states == [{"state": "skipped", "n": 57}, {"state": "succeeded", "n": 3}]
        untouched = await fetch_one(
            sessions,
            "SELECT count(*) AS n FROM rollout_targets t JOIN vehicles v ON v.id = t.vehicle_id"
            " WHERE t.rollout_id = :r AND t.state = 'skipped'"
            " AND v.desired_release_version = :old",
            r=rollout_id,
            old=OLD_RELEASE,
        )
        assert untouched["n"] == 57
        assert (await _search_attributes(handle))["RolloutStatus"] == "aborted"
        last = await fetch_one(
            sessions,
            "SELECT action, actor, reason FROM audit_log WHERE target_type = 'rollout'"
            " AND target_id = :t ORDER BY id DESC LIMIT 1",
            t=str(rollout_id),
        )
        assert last == {"action": "rollout.aborted", "actor": "bob", "reason": "bad build"}


async def test_rollback_returns_the_touched_vehicles(
    time_skipping_env: WorkflowEnvironment, rollout: StartRollout, sessions: Sessions
) -> None:
    async with lenient(rollout, sessions) as (rollout_id, handle):
        await until(handle, baking("canary"))
        # Time skips only when asked while nobody waits. Half a gate tick past the canary's bake:
        # the signal below must not land on the instant a tick timer fires (a signal and a timer
        # at the same virtual instant have been seen to wedge the time-skipping test server).
        await time_skipping_env.sleep(HOUR + 30)
        await until(handle, baking("wave-1"))
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


async def test_refused_signals_are_audited_at_once(
    rollout: StartRollout, sessions: Sessions
) -> None:
    """A refused signal wakes the workflow, baking or paused, and is audited at once (no timer
    fires here: time skips only when a test waits for a result or sleeps), in the order of
    the signals around the accepted ones."""
    started = await rollout(gates=LENIENT_GATES, timeouts=NEVER_TIMES_OUT)
    rollout_id, handle = started

    async def refused(action: str) -> list[dict[str, Any]]:
        return await eventually(
            lambda: fetch_all(
                sessions,
                "SELECT actor, source, reason, result, payload FROM audit_log"
                " WHERE target_type = 'rollout' AND target_id = :t AND action = :a",
                t=str(rollout_id),
                a=f"rollout.{action}_refused",
            ),
            lambda rows: len(rows) == 1,
        )

    async with reporting_fleet(sessions, started):  # the canary settles, then bakes
        await until(handle, baking("canary"))
        await handle.signal("resume", RolloutSignal(reason="too early", actor="alice"))
        (entry,) = await refused("resume")
        assert entry["payload"]["message"] == "cannot resume: rollout is running, not paused"
        assert {k: entry[k] for k in ("actor", "source", "reason", "result")} == {
            "actor": "alice",
            "source": "temporal",
            "reason": "too early",
            "result": "refused",
        }
        assert {k: entry["payload"][k] for k in ("action", "via", "status", "refusalsDropped")} == {
            "action": "resume",
            "via": "signal",
            "status": "running",
            "refusalsDropped": 0,
        }

        await handle.signal("pause", RolloutSignal(reason="investigating", actor="bob"))
        await until(handle, lambda s: s.status == "paused")
        await handle.signal("pause", RolloutSignal(reason="again", actor="bob"))  # waits for resume
        (entry,) = await refused("pause")
        assert entry["payload"]["message"] == "cannot pause: rollout is already paused"

        await handle.signal("abort", RolloutSignal(reason="enough", actor="bob"))
        assert (await handle.result()).status == "aborted"
        operators = await fetch_all(
            sessions,
            "SELECT action FROM audit_log WHERE target_type = 'rollout' AND target_id = :t"
            " AND source = 'temporal' ORDER BY id",
            t=str(rollout_id),
        )
        assert [row["action"] for row in operators] == [
            "rollout.resume_refused",
            "rollout.paused",
            "rollout.pause_refused",
            "rollout.aborted",
        ]
