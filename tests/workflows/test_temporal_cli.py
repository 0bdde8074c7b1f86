"""Operators steer rollouts with the real `temporal` CLI: a pause signal with the JSON body of
SPEC.md pauses the rollout in PostgreSQL and leaves an audit entry with source `temporal`,
whatever source its body claims; so does a `control` Update sent with the CLI, and what the
workflow refuses (a signal, an Update) is audited too, with result `refused`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from core.temporal import ROLLOUT_WORKFLOW_TYPE, rollout_workflow_id
from devtools import localservers
from models.workflows import RolloutInput
from tests.factories import Sessions, fleet_rollout
from worker.main import build_worker

RELEASE = "2026.3.0-cli"


async def temporal_cli(env: WorkflowEnvironment, *args: str, succeeds: bool = True) -> str:
    """Run the `temporal` CLI against `env`; its output (it must exit 0, or must not when
    `succeeds` is False)."""
    address = env.client.service_client.config.target_host
    proc = await asyncio.create_subprocess_exec(
        localservers.venv_binary("temporal"),
        *args,
        "--address",
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert (proc.returncode == 0) is succeeds, out.decode()
    return out.decode()


async def wait_for_row(sessions: Sessions, sql: str, params: dict[str, Any], want: Any) -> Any:
    row = None
    for _ in range(100):
        async with sessions() as session:
            row = (await (await session.connection()).execute(text(sql), params)).first()
        if row is not None and tuple(row) == want:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sql} gave {row}, not {want}")


async def signal(env: WorkflowEnvironment, workflow_id: str, name: str, body: dict) -> None:
    """`temporal workflow signal` with the JSON body of SPEC.md, as an operator sends it."""
    await temporal_cli(
        env,
        "workflow",
        "signal",
        "--workflow-id",
        workflow_id,
        "--name",
        name,
        "--input",
        json.dumps(body),
    )


async def wait_for_audit(sessions: Sessions, rollout_id: int, action: str, want: Any) -> None:
    """The rollout's audit entry of that action says (actor, source, reason) == `want`."""
    await wait_for_row(
        sessions,
        "SELECT actor, source, reason FROM audit_log"
        " WHERE target_type = 'rollout' AND target_id = :id AND action = :action",
        {"id": str(rollout_id), "action": action},
        want,
    )


async def wait_for_refusal(sessions: Sessions, rollout_id: int, action: str, want: Any) -> None:
    """The rollout's entry `rollout.{action}_refused` says (actor, source, reason, result,
    via) == `want`."""
    await wait_for_row(
        sessions,
        "SELECT actor, source, reason, result, payload ->> 'via' FROM audit_log"
        " WHERE target_type = 'rollout' AND target_id = :id AND action = :action",
        {"id": str(rollout_id), "action": f"rollout.{action}_refused"},
        want,
    )


async def update(env: WorkflowEnvironment, workflow_id: str, body: dict, **kw: Any) -> str:
    """`temporal workflow update execute` of the `control` Update, as an operator sends it."""
    return await temporal_cli(
        env,
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        workflow_id,
        "--name",
        "control",
        "--input",
        json.dumps(body),
        **kw,
    )


async def start(
    env: WorkflowEnvironment, sessions: Sessions, task_queue: str, name: str
) -> tuple[int, str]:
    rollout_id, _ = await fleet_rollout(
        sessions,
        name=name,
        vehicles=20,
        release=RELEASE,
        strategy={
            "canary": {"size": 1, "bakeSeconds": 3600},
            "waves": [{"percent": 100, "bakeSeconds": 0}],
        },
    )
    workflow_id = rollout_workflow_id(rollout_id)
    await env.client.start_workflow(
        ROLLOUT_WORKFLOW_TYPE,
        RolloutInput(rollout_id=rollout_id, release_version=RELEASE),
        id=workflow_id,
        task_queue=task_queue,
    )
    return rollout_id, workflow_id


async def test_every_control_through_the_cli_is_audited(
    dev_server_env: WorkflowEnvironment,
    sessions: Sessions,
    task_queue: str,
) -> None:
    async with build_worker(dev_server_env.client, sessions, task_queue=task_queue):
        rollout_id, workflow_id = await start(dev_server_env, sessions, task_queue, "cliau")
        try:
            status_sql = "SELECT status, status_reason FROM rollouts WHERE id = :id"
            await wait_for_row(sessions, status_sql, {"id": rollout_id}, ("running", None))
            # A signal the workflow refuses (resume of a running rollout) is audited.
            early = {"reason": "too early", "actor": "alice"}
            await signal(dev_server_env, workflow_id, "resume", early)
            refused = ("alice", "temporal", "too early", "refused", "signal")
            await wait_for_refusal(sessions, rollout_id, "resume", refused)

            # An Update claiming to come from the API is audited as source temporal.
            pause = {"action": "pause", "reason": "quiet", "actor": "mallory", "source": "api"}
            answer = await update(dev_server_env, workflow_id, pause)
            assert "status:paused" in answer, answer
            await wait_for_row(sessions, status_sql, {"id": rollout_id}, ("paused", "OPERATOR"))
            paused = ("mallory", "temporal", "quiet")
            await wait_for_audit(sessions, rollout_id, "rollout.paused", paused)

            # An Update the workflow refuses: the CLI is told, and the refusal is audited.
            again = {"action": "pause", "reason": "again", "actor": "mallory", "source": "api"}
            out = await update(dev_server_env, workflow_id, again, succeeds=False)
            assert "cannot pause: rollout is already paused" in out, out
            refused = ("mallory", "temporal", "again", "refused", "update")
            await wait_for_refusal(sessions, rollout_id, "pause", refused)
        finally:
            await dev_server_env.client.get_workflow_handle(workflow_id).terminate("test over")


async def test_pause_and_resume_with_the_temporal_cli(
    dev_server_env: WorkflowEnvironment,
    sessions: Sessions,
    task_queue: str,
) -> None:
    async with build_worker(dev_server_env.client, sessions, task_queue=task_queue):
        rollout_id, workflow_id = await start(dev_server_env, sessions, task_queue, "cli")
        handle = dev_server_env.client.get_workflow_handle(workflow_id)
        try:
            status_sql = "SELECT status, status_reason FROM rollouts WHERE id = :id"
            await wait_for_row(sessions, status_sql, {"id": rollout_id}, ("running", None))

            pause = {"reason": "investigating", "actor": "alice"}
            await signal(dev_server_env, workflow_id, "pause", pause)
            await wait_for_row(sessions, status_sql, {"id": rollout_id}, ("paused", "OPERATOR"))
            paused = ("alice", "temporal", "investigating")
            await wait_for_audit(sessions, rollout_id, "rollout.paused", paused)

            # A signal is audited as source temporal whatever its body claims (SPEC.md).
            resume = {"reason": "fixed", "actor": "bob", "source": "api"}
            await signal(dev_server_env, workflow_id, "resume", resume)
            await wait_for_row(sessions, status_sql, {"id": rollout_id}, ("running", None))
            resumed = ("bob", "temporal", "fixed")
            await wait_for_audit(sessions, rollout_id, "rollout.resumed", resumed)
            # The query answers the operator too.
            progress = await temporal_cli(
                dev_server_env,
                "workflow",
                "query",
                "--workflow-id",
                workflow_id,
                "--name",
                "progress",
                "--output",
                "json",
            )
            assert '"paused":false' in progress.replace(" ", "")
        finally:
            await handle.terminate("test over")
