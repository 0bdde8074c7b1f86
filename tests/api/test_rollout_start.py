"""A rollout's start survives a failed or ambiguous start of its workflow (issue 20): the
committed `pending` row is the intent to start, the reconcile finishes the start, a pending
rollout can be aborted, and a retried control is applied once. Real PostgreSQL (a database
of the test's own where the reconcile scans every pending rollout), the real dev server, the
real app served by uvicorn."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.reconcile import ReconcileActivities
from core import temporal
from core.db import create_engine, session_factory
from core.settings import Settings
from devtools.localservers import free_port
from models.workflows import RolloutState, StartPendingInput, StartPendingResult
from tests.api.conftest import served
from tests.api.test_releases_and_rollouts import rollout_body
from tests.api.test_rollout_control import audit_rows, create_rollout, wait_for_status
from tests.factories import Sessions, insert_signed_release, insert_vehicles
from worker.main import build_worker

ONE_HOUR_CANARY = {
    "canary": {"size": 1, "bakeSeconds": 3600},
    "waves": [{"percent": 100, "bakeSeconds": 0}],
}


@dataclass
class OwnStack:
    """An app over a database of the test's own; rollout ids start high and random, so their
    workflow ids never meet the shared database's on the shared dev server."""

    database_url: str
    sessions: Sessions
    settings: Settings
    client: Client

    def row(self, rid: int) -> dict[str, Any]:
        with psycopg.connect(self.database_url) as conn:
            found = conn.execute(
                "SELECT status, status_reason, waiting_for, started_at FROM rollouts WHERE id = %s",
                (rid,),
            ).fetchone()
        assert found is not None
        return dict(
            zip(("status", "status_reason", "waiting_for", "started_at"), found, strict=True)
        )

    async def reconcile_start(self, task_queue: str) -> StartPendingResult:
        """The reconcile's start pass, as its activity runs, past the grace period."""
        activities = ReconcileActivities(self.sessions, client=self.client, task_queue=task_queue)
        return await ActivityEnvironment().run(
            activities.start_pending_rollouts,
            StartPendingInput(created_before=datetime.now(UTC) + timedelta(seconds=1)),
        )

    async def status(self, rid: int, wanted: str, within: float = 30) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + within
        while (row := self.row(rid))["status"] != wanted:
            assert asyncio.get_running_loop().time() < deadline, row
            await asyncio.sleep(0.2)
        return row


@pytest.fixture
async def own_stack(
    api_settings: Settings, own_database: str, dev_server_env: WorkflowEnvironment
) -> AsyncIterator[OwnStack]:
    with psycopg.connect(own_database, autocommit=True) as conn:
        first = 10**12 + secrets.randbelow(10**9) * 1000
        conn.execute("SELECT setval(pg_get_serial_sequence('rollouts', 'id'), %s)", (first,))
    settings = api_settings.model_copy(update={"database_url": own_database})
    engine = create_engine(url=own_database)
    try:
        yield OwnStack(own_database, session_factory(engine), settings, dev_server_env.client)
    finally:
        await engine.dispose()


def fleet(database_url: str, key: Ed25519PrivateKey, n: int = 3) -> dict[str, Any]:
    """A signed release and `n` vehicles ready to be notified; the rollout's body."""
    prefix = f"S{secrets.token_hex(3).upper()}-"
    release = f"{prefix}2027.2.0"
    insert_signed_release(database_url, key, release)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    insert_vehicles(database_url, ids, battery_percent=90)
    return rollout_body(release, targets={"vehicleIds": ids}, strategy=ONE_HOUR_CANARY)


def app_at(settings: Settings, **update: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return served(settings, http_timeout=60, **update)


async def workflow_runs(client: Client, rid: int, expected: int) -> int:
    """How many executions the dev server lists under `rollout-{rid}` (visibility settles
    within moments: polled until it shows `expected`, for a few seconds)."""
    query = f"WorkflowId = '{temporal.rollout_workflow_id(rid)}'"
    for _ in range(50):
        runs = [w async for w in client.list_workflows(query)]
        if len(runs) == expected:
            break
        await asyncio.sleep(0.1)
    return len(runs)


async def terminate(client: Client, rid: int) -> None:
    """Leave no workflow of the own database behind on the shared dev server."""
    try:
        await client.get_workflow_handle(temporal.rollout_workflow_id(rid)).terminate("test done")
    except RPCError:
        pass


async def test_a_failed_start_leaves_the_rollout_pending_and_the_reconcile_starts_it(
    own_stack: OwnStack, operator: dict, signing_key: Ed25519PrivateKey, task_queue: str
) -> None:
    body = fleet(own_stack.database_url, signing_key)
    # Temporal unreachable from this app: nothing listens on its address.
    async with app_at(own_stack.settings, temporal_address=f"127.0.0.1:{free_port()}") as http:
        created = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert created.status_code == 201, created.text
        rid = created.json()["data"]["id"]
        assert created.json()["metadata"]["workflowStart"] == "pending"
        assert created.json()["data"]["status"] == "pending"
        assert created.json()["data"]["waitingFor"] == "its workflow to start"
        # Its vehicles are held: the same rollout created again is a conflict, not a double.
        again = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert again.status_code == 409, again.text
    assert own_stack.row(rid)["status"] == "pending"
    with pytest.raises(RPCError) as missing:
        await own_stack.client.get_workflow_handle(temporal.rollout_workflow_id(rid)).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    try:
        # The reconcile finishes the start; a worker runs it.
        first = await own_stack.reconcile_start(task_queue)
        assert (first.pending, first.started, first.running, first.refused) == (1, 1, 0, 0)
        async with build_worker(own_stack.client, own_stack.sessions, task_queue=task_queue):
            row = await own_stack.status(rid, "running")
            assert row["started_at"] is not None
            # The next reconcile finds nothing pending: nothing is started twice.
            second = await own_stack.reconcile_start(task_queue)
            assert (second.pending, second.started) == (0, 0)
        assert await workflow_runs(own_stack.client, rid, 1) == 1
    finally:
        await terminate(own_stack.client, rid)


async def test_an_ambiguous_start_is_not_failed_and_starts_no_second_workflow(
    own_stack: OwnStack,
    operator: dict,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start reached Temporal but its answer was lost (the fault injected: the real start
    runs, then the call raises as a timeout would): the rollout stays `pending`, the
    reconcile finds its workflow and leaves it, one execution runs it."""
    real_start = temporal.start_rollout_workflow

    async def answer_lost(client: Client, **kw: Any) -> bool:
        await real_start(client, **kw)
        raise TimeoutError("the answer of StartWorkflowExecution was lost")

    monkeypatch.setattr(temporal, "start_rollout_workflow", answer_lost)
    body = fleet(own_stack.database_url, signing_key)
    rid = 0
    try:
        async with app_at(own_stack.settings) as http:
            created = await http.post("/api/v1/rollouts", headers=operator, json=body)
            assert created.status_code == 201, created.text
            rid = created.json()["data"]["id"]
            assert created.json()["metadata"]["workflowStart"] == "pending"
        monkeypatch.setattr(temporal, "start_rollout_workflow", real_start)
        assert own_stack.row(rid)["status"] == "pending"  # never failed
        # No worker polls yet: the workflow exists, it has not written `running`.
        found = await own_stack.reconcile_start(temporal.ROLLOUT_TASK_QUEUE)
        assert (found.pending, found.started, found.running) == (1, 0, 1)
        async with build_worker(
            own_stack.client, own_stack.sessions, task_queue=temporal.ROLLOUT_TASK_QUEUE
        ):
            await own_stack.status(rid, "running")
        assert await workflow_runs(own_stack.client, rid, 1) == 1
        assert own_stack.row(rid)["status"] == "running"
    finally:
        if rid:
            await terminate(own_stack.client, rid)


async def test_abort_of_a_pending_rollout_without_workflow(
    own_stack: OwnStack,
    operator: dict,
    signing_key: Ed25519PrivateKey,
    task_queue: str,
) -> None:
    """One replica lost Temporal when the rollout was created; an operator aborts it through
    another: written directly, audited; a late start of its workflow ends at once."""
    body = fleet(own_stack.database_url, signing_key)
    async with app_at(own_stack.settings, temporal_address=f"127.0.0.1:{free_port()}") as http:
        created = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert created.status_code == 201, created.text
        rid = created.json()["data"]["id"]
    try:
        async with app_at(own_stack.settings) as http:
            aborted = await http.post(
                f"/api/v1/rollouts/{rid}/abort",
                headers={**operator, "X-Request-ID": f"abort-pending-{rid}"},
                json={"reason": "wrong release"},
            )
            assert aborted.status_code == 202, aborted.text
            assert aborted.json()["data"]["control"]["status"] == "aborted"
            assert aborted.json()["data"]["rollout"]["status"] == "aborted"
            # Aborted: a second abort is refused at once.
            again = await http.post(
                f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "again"}
            )
            assert again.status_code == 409, again.text
        row = own_stack.row(rid)
        assert (row["status"], row["status_reason"], row["waiting_for"]) == (
            "aborted",
            "OPERATOR",
            None,
        )
        audited = [
            (action, *entry[:3], entry[4])
            for action in ("rollout.abort_requested", "rollout.aborted")
            for entry in audit_rows(own_stack.database_url, rid, action)
        ]
        assert audited == [
            ("rollout.abort_requested", "dev-operator", "operator", "api", f"abort-pending-{rid}"),
            ("rollout.aborted", "dev-operator", "operator", "api", f"abort-pending-{rid}"),
        ]
        # The reconcile leaves an aborted rollout alone.
        assert (await own_stack.reconcile_start(task_queue)).pending == 0
        # A late start (say, the lost first attempt landing now): the workflow reads the row,
        # ends at once, issues nothing.
        async with build_worker(own_stack.client, own_stack.sessions, task_queue=task_queue):
            assert await temporal.start_rollout_workflow(
                own_stack.client,
                rollout_id=rid,
                release_version=body["releaseVersion"],
                correlation_id=None,
                created_by="test",
                task_queue=task_queue,
            )
            handle = own_stack.client.get_workflow_handle(temporal.rollout_workflow_id(rid))
            async with asyncio.timeout(30):
                result = await handle.result()
        assert result["status"] == "aborted" and result["stages_issued"] == 0
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        with psycopg.connect(own_stack.database_url) as conn:
            targets = conn.execute(
                "SELECT count(*) FROM rollout_targets WHERE rollout_id = %s", (rid,)
            ).fetchone()
        assert targets == (0,)
        assert own_stack.row(rid)["status"] == "aborted"
        assert audit_rows(own_stack.database_url, rid, "rollout.started") == []
    finally:
        await terminate(own_stack.client, rid)


async def test_abort_of_a_running_rollout_whose_workflow_is_gone_is_a_409(
    own_stack: OwnStack, operator: dict, signing_key: Ed25519PrivateKey
) -> None:
    """The row says `running` but no workflow exists (terminated by hand, or it closed a
    moment before): the API does not write the abort itself (only a `pending` row), asks the
    workflow once more and answers 409, audited; never a 500."""
    body = fleet(own_stack.database_url, signing_key)
    async with app_at(own_stack.settings, temporal_address=f"127.0.0.1:{free_port()}") as http:
        created = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert created.status_code == 201, created.text
        rid = created.json()["data"]["id"]
    with psycopg.connect(own_stack.database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'running' WHERE id = %s", (rid,))
    async with app_at(own_stack.settings) as http:
        aborted = await http.post(
            f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "gone"}
        )
    assert aborted.status_code == 409, aborted.text
    assert aborted.json()["error"]["code"] == "INVALID_STATE_TRANSITION"
    assert own_stack.row(rid)["status"] == "running"
    assert len(audit_rows(own_stack.database_url, rid, "rollout.abort_rejected")) == 1


async def test_a_control_retried_with_the_same_idempotency_key_is_applied_once(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    dev_server_env: WorkflowEnvironment,
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first pause gets no answer in time (the worker is down): 503, and the key is
    released. The client retries with the same Idempotency-Key once a worker is back: one
    Update (the same id), one transition, one `requested` entry, and the retry answers 202."""
    client = dev_server_env.client
    worker = build_worker(client, sessions, task_queue=temporal.ROLLOUT_TASK_QUEUE)
    async with worker:
        rid = await create_rollout(
            http, operator, database_url, signing_key, prefix, strategy=ONE_HOUR_CANARY
        )
        await wait_for_status(http, viewer, rid, "running")
        await wait_for_baking(client, rid)
    answer_within = temporal.CONTROL_ANSWER_WITHIN
    monkeypatch.setattr(temporal, "CONTROL_ANSWER_WITHIN", timedelta(seconds=3))
    headers = {**operator, "Idempotency-Key": f"pause-{prefix}"}
    pause = {"reason": "investigating"}
    try:
        first = await http.post(f"/api/v1/rollouts/{rid}/pause", headers=headers, json=pause)
        assert first.status_code == 503, first.text
        # The retry gets the usual window: a worker that has just started may take more than
        # 3 s to take its first task on a loaded machine.
        monkeypatch.setattr(temporal, "CONTROL_ANSWER_WITHIN", answer_within)
        async with build_worker(client, sessions, task_queue=temporal.ROLLOUT_TASK_QUEUE):
            retried = await http.post(f"/api/v1/rollouts/{rid}/pause", headers=headers, json=pause)
            assert retried.status_code == 202, retried.text
            assert retried.json()["data"]["control"]["paused"] is True
            await wait_for_status(http, viewer, rid, "paused")
            state = await client.get_workflow_handle(temporal.rollout_workflow_id(rid)).query(
                "progress", result_type=RolloutState
            )
        assert state.control_seq == 1  # one Update reached the workflow
        assert len(audit_rows(database_url, rid, "rollout.pause_requested")) == 1
        assert audit_rows(database_url, rid, "rollout.pause_refused") == []
        with psycopg.connect(database_url) as conn:
            paused_events = conn.execute(
                "SELECT count(*) FROM change_feed WHERE topic = 'rollouts' AND entity_id = %s"
                " AND payload ->> 'status' = 'paused'",
                (str(rid),),
            ).fetchone()
        assert paused_events == (1,)  # one transition
    finally:
        await terminate(client, rid)


async def wait_for_baking(client: Client, rid: int) -> None:
    """Until the canary settles or bakes (its vehicle reports nothing: a long durable wait,
    no activity in flight)."""
    handle = client.get_workflow_handle(temporal.rollout_workflow_id(rid))
    for _ in range(150):
        state = await handle.query("progress", result_type=RolloutState)
        if state.phase in ("settle", "bake") and state.waiting_for:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"rollout {rid} does not bake: {state.phase} {state.waiting_for}")
