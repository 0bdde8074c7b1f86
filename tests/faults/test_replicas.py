"""Two API replicas, two workers and two ingest processes on one database and one Temporal.

A rollout of 2,000 vehicles (canary, two waves) is created through API 1, paused and resumed
through API 2; the vehicles answer through both ingest processes in turn; both workers poll
the one task queue. The worker the workflow runs on is frozen (SIGSTOP) for 15 s while the
pause is sent: the workflow task handed to its open poll times out (10 s) and the other
worker answers the pause; the frozen one, woken up (SIGCONT), finishes what it held.

Afterwards: the rollout completed, one workflow ran it, every target notified exactly once,
the counters equal the targets. A live stream on API 1 saw what was written through the
others: the pause and the resume made through API 2 (`rollout.updated`), and the vehicles
that answered through ingest 2 (`vehicle.updated`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from core.temporal import rollout_workflow_id
from models.enums import Role
from tests.faults.cluster import Cluster, wait_until
from tests.faults.conftest import (
    Vehicles,
    create_rollout,
    fleet,
    rollout,
    rollout_body,
    signed_release,
)

pytestmark = pytest.mark.slow

VEHICLES = 2_000
FREEZE_SECONDS = 15
REGION = "faults-rep"


class Stream:
    """`GET /api/v1/stream` read in a thread: its events (name, data) as they arrive."""

    def __init__(self, base_url: str, headers: dict[str, str], topics: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = threading.Event()
        self._client = httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=None))
        self._args = (headers, topics)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        headers, topics = self._args
        name, data = "", ""
        try:
            with self._client.stream(
                "GET", "/api/v1/stream", params={"topics": topics}, headers=headers
            ) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith(": subscribed"):
                        self.subscribed.set()
                    elif line.startswith("event:"):
                        name = line.partition(":")[2].strip()
                    elif line.startswith("data:"):
                        data = line.partition(":")[2].strip()
                    elif line == "" and name:
                        self.events.append((name, json.loads(data) if data else {}))
                        name, data = "", ""
        except httpx.HTTPError:
            pass  # closed by `close()`

    def saw(self, predicate: Any) -> bool:
        return any(predicate(name, data) for name, data in list(self.events))

    def close(self) -> None:
        self._client.close()
        self._thread.join(timeout=5)


class TwoGateways(Vehicles):
    """The vehicles, answering through ingest 1 and ingest 2: every other newly notified
    vehicle (in vehicle id order) through each, so both carry about half of every stage
    whatever the timing of the test's polls."""

    def __init__(self, cluster: Cluster, first: httpx.Client, second: httpx.Client) -> None:
        super().__init__(cluster, first)
        self.clients = [first, second]
        self.through_second: set[str] = set()

    def answer(self, rollout_id: int) -> int:
        todo = self.unanswered(rollout_id)
        for turn, client in enumerate(self.clients):
            mine = todo[turn::2]
            self.http = client
            for start in range(0, len(mine), 1000):
                self._post(mine[start : start + 1000])
            if turn == 1:
                self.through_second.update(vid for vid, _ in mine)
        return len(todo)


async def _workflow_runs(address: str, rollout_id: int) -> list[str]:
    client = await Client.connect(address)
    query = f"WorkflowId = '{rollout_workflow_id(rollout_id)}'"
    return [str(w.status.name if w.status else None) async for w in client.list_workflows(query)]


def test_two_of_everything_complete_a_rollout_once_and_stream_across(cluster: Cluster) -> None:
    for name in ("api-1", "api-2"):
        cluster.add_api(name)
    for name in ("ingest-1", "ingest-2"):
        cluster.add_ingest(name)
    for name in ("worker-1", "worker-2"):
        cluster.add_worker(name)
    for name in list(cluster.procs):
        if name != "temporal":
            cluster.start(name)
    release = signed_release(cluster)
    fleet(cluster, "RP", VEHICLES, REGION)
    viewer = cluster.token(Role.VIEWER, "fault-viewer")
    operator = cluster.token(Role.OPERATOR, "fault-operator")
    stream = Stream(cluster["api-1"].base_url, viewer, "vehicles,rollouts")
    try:
        assert stream.subscribed.wait(30), "the stream on API 1 did not open"
        with (
            cluster.client("api-1") as api1,
            cluster.client("api-2") as api2,
            cluster.client("ingest-1") as in1,
            cluster.client("ingest-2") as in2,
        ):
            vehicles = TwoGateways(cluster, in1, in2)
            body = rollout_body(
                REGION,
                release=release,
                canary=20,
                waves=[{"percent": 50, "bakeSeconds": 1}, {"percent": 100, "bakeSeconds": 1}],
            )
            created = create_rollout(api1, cluster, body)
            assert created.status_code == 201, created.text
            rid = int(created.json()["data"]["id"])

            def streamed(status: str) -> bool:
                return stream.saw(
                    lambda n, d: (
                        n == "rollout.updated" and d.get("id") == rid and d.get("status") == status
                    )
                )

            wait_until(lambda: streamed("running"), within=60, what="running, on API 1")
            # Freeze (SIGSTOP) the worker the workflow runs on, for FREEZE_SECONDS: the other
            # one takes the workflow over (a task handed to the frozen worker's open poll is
            # given to the other after the 10 s workflow task timeout).
            frozen = next(
                name
                for name in ("worker-1", "worker-2")
                if f'"workflow_id": "{rollout_workflow_id(rid)}"' in cluster[name].log.read_text()
            )
            cluster[frozen].signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            paused = api2.post(
                f"/api/v1/rollouts/{rid}/pause", json={"reason": "replica B"}, headers=operator
            )
            assert paused.status_code == 202, paused.text
            took_over = time.monotonic() - frozen_at
            time.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - frozen_at)))
            cluster[frozen].signal(signal.SIGCONT)
            wait_until(lambda: streamed("paused"), within=90, what="paused via B, seen on A")
            paused_after = time.monotonic() - frozen_at
            resumed = api2.post(
                f"/api/v1/rollouts/{rid}/resume", json={"reason": "replica B"}, headers=operator
            )
            assert resumed.status_code == 202, resumed.text
            final = vehicles.until_finished(rid, api2, within=180)
            assert rollout(api1, cluster, rid)["status"] == final["status"]
            second = set(vehicles.through_second)

            def deltas_seen() -> bool:
                seen = {
                    v["id"]
                    for n, d in list(stream.events)
                    if n == "vehicle.updated"
                    for v in d.get("vehicles", [])
                    if v.get("status") == "in_sync"
                }
                return second <= seen

            wait_until(deltas_seen, within=60, what="ingest 2's vehicles, streamed on API 1")
    finally:
        stream.close()

    assert final["status"] == "completed", final
    assert final["progress"]["targeted"] == final["progress"]["succeeded"] == VEHICLES
    assert len(second) >= VEHICLES // 4, len(second)
    assert cluster.sql(
        "SELECT state, attempt, count(*) FROM rollout_targets WHERE rollout_id = %s GROUP BY 1, 2",
        (rid,),
    ) == [("succeeded", 1, VEHICLES)]
    counters = cluster.one(
        "SELECT targeted, notified, succeeded, failed, blocked FROM rollouts WHERE id = %s",
        (rid,),
    )
    assert counters == (VEHICLES, VEHICLES, VEHICLES, 0, 0), counters
    assert (
        cluster.one("SELECT count(*) FROM desired_states WHERE rollout_id = %s", (rid,)) == 3
    )  # one per stage
    assert asyncio.run(_workflow_runs(cluster.temporal_address, rid)) == ["COMPLETED"]
    assert cluster[frozen].running()
    print(
        f"{frozen} frozen {FREEZE_SECONDS} s: the pause through API 2 was answered after"
        f" {took_over:.1f} s; the rollout paused {paused_after:.1f} s after the freeze;"
        f" vehicles answered through ingest 2: {len(second)}"
    )
