"""`OutcomeSignals`, the ingest path's "look again" to rollout workflows, against the dev
server: a burst of notifications is a handful of signals, never one per event; a rollout
whose workflow is gone costs nothing but a dropped signal."""

from __future__ import annotations

import asyncio
import json
import secrets

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from core.temporal import (
    OUTCOMES_SIGNAL,
    ROLLOUT_WORKFLOW_TYPE,
    OutcomeSignals,
    rollout_workflow_id,
)
from models.workflows import RolloutInput
from tests.workflows.conftest import eventually


async def _signals_in_history(client: Client, workflow_id: str) -> list[int]:
    """The `events` count of each `outcomes` signal the workflow received."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    received = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attributes = event.workflow_execution_signaled_event_attributes
            assert attributes.signal_name == OUTCOMES_SIGNAL
            payload = attributes.input.payloads[0].data
            received.append(int(json.loads(payload)["events"]))
    return received


async def test_a_burst_of_outcomes_is_a_handful_of_signals(
    dev_server_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = dev_server_env.client
    rollout_id = 10**9 + secrets.randbelow(10**9)
    # A workflow nobody runs (no worker on this queue): the server keeps its signals.
    await client.start_workflow(
        ROLLOUT_WORKFLOW_TYPE,
        RolloutInput(rollout_id=rollout_id, release_version="1"),
        id=rollout_workflow_id(rollout_id),
        task_queue=task_queue,
    )

    async def connect() -> Client:
        return client

    signals = OutcomeSignals(connect, interval_seconds=0.5)
    await signals.start()
    try:
        # 1,000 groups of telemetry over about 1.2 s, 3 targets moved each.
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(40):
            for _ in range(25):
                signals.notify({rollout_id: 3})
            await asyncio.sleep(0.03)
        burst = loop.time() - began
        received = await eventually(
            lambda: _signals_in_history(client, rollout_workflow_id(rollout_id)),
            lambda got: sum(got) == 3000,
        )

        async def accounted() -> int:  # the last send may be in history before its answer
            return signals.sent + signals.dropped

        await eventually(accounted, lambda n: n >= len(received))
    finally:
        await signals.stop()
    # The first at once, then at most one per half second (and the trailing one): a handful
    # for the whole burst, whatever it lasted here, and never one per notification.
    assert 2 <= len(received) <= 2 + burst / 0.5, (received, burst)
    assert signals.sent == len(received) and signals.dropped == 0
    await client.get_workflow_handle(rollout_workflow_id(rollout_id)).terminate("test over")


async def test_a_signal_to_a_finished_or_unknown_workflow_is_dropped(
    dev_server_env: WorkflowEnvironment,
) -> None:
    async def connect() -> Client:
        return dev_server_env.client

    signals = OutcomeSignals(connect, interval_seconds=0.1)
    await signals.start()
    try:
        signals.notify({10**12 + secrets.randbelow(10**9): 1})  # no such workflow
        await eventually(lambda: _dropped(signals), lambda dropped: dropped == 1)
        assert signals.sent == 0
    finally:
        await signals.stop()


async def _dropped(signals: OutcomeSignals) -> int:
    return signals.dropped
