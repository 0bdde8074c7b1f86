"""The Temporal server stopped (SIGKILL) for 30 s while a rollout bakes its canary, then
started again on the same database file.

While it is down: the API's `/readyz` says 503, telemetry still answers `202` (ingest needs
only PostgreSQL), and a second rollout is created (`POST /rollouts` with an Idempotency-Key).
The contract for that create is "never stuck, never doubled": it answers 201 with the rollout
`pending` (`metadata.workflowStart: "pending"`), and the reconcile starts its workflow once
Temporal is back (after MOTORCADE_ROLLOUT_START_GRACE_SECONDS). Afterwards:
- the baking rollout resumes (its durable bake timer fires), issues its wave and completes,
  every target notified once;
- no rollout is left `pending`; each rollout row has exactly one workflow, except a `failed`
  one, which has none (a failed rollout whose workflow runs would issue twice);
- every vehicle of the second rollout is notified by exactly one rollout, and one completes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import Client

from core.temporal import rollout_workflow_id
from models.enums import Role
from tests.faults.cluster import Cluster, timed, wait_until
from tests.faults.conftest import (
    Vehicles,
    create_rollout,
    fleet,
    rollout,
    rollout_body,
    signed_release,
)

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 30
REGION_A = "faults-tr-a"
REGION_B = "faults-tr-b"


async def _workflows(address: str, rollout_ids: list[int]) -> dict[int, list[str]]:
    """Each rollout's workflow executions (their statuses) as Temporal lists them."""
    client = await Client.connect(address)
    found: dict[int, list[str]] = {}
    for rid in rollout_ids:
        found[rid] = [
            str(w.status.name if w.status else None)
            async for w in client.list_workflows(f"WorkflowId = '{rollout_workflow_id(rid)}'")
        ]
    return found


def test_temporal_stopped_mid_bake_resumes_and_starts_nothing_twice(cluster: Cluster) -> None:
    cluster.settings.update(
        {
            "MOTORCADE_RECONCILE_INTERVAL_SECONDS": "5",
            "MOTORCADE_ROLLOUT_START_GRACE_SECONDS": "5",
        }
    )
    cluster.add_api()
    cluster.add_ingest()
    cluster.add_worker(reconcile=True)
    for name in ("api", "ingest", "worker"):
        cluster.start(name)
    release = signed_release(cluster)
    fleet(cluster, "TA", 100, REGION_A)
    fleet(cluster, "TB", 50, REGION_B)

    with cluster.client("api") as api, cluster.client("ingest") as ingest:
        vehicles = Vehicles(cluster, ingest)
        created = create_rollout(
            api, cluster, rollout_body(REGION_A, release=release, canary=10, canary_bake=15)
        )
        assert created.status_code == 201, created.text
        rid_a = int(created.json()["data"]["id"])
        wait_until(lambda: vehicles.answer(rid_a) == 10, within=60, what="canary notified")
        wait_until(
            lambda: "bake" in str(rollout(api, cluster, rid_a).get("waitingFor")),
            within=60,
            what="the canary bakes",
        )

        # Temporal goes away for OUTAGE_SECONDS.
        cluster["temporal"].kill()
        stopped = time.monotonic()
        ready = api.get("/readyz")
        read = rollout(api, cluster, rid_a)  # reads answer from PostgreSQL
        beat = ingest.post(
            "/api/v1/telemetry",
            json={
                "heartbeats": [
                    {
                        "vehicleId": "TA000050",
                        "sentAt": _now(),
                        "batteryPercent": 80,
                        "stationary": True,
                    }
                ]
            },
            headers=cluster.token(Role.GATEWAY, "fault-gateway"),
        )
        key = str(uuid.uuid4())
        body_b = rollout_body(REGION_B, release=release, canary=5, name="created during outage")
        with timed() as took:
            during = create_rollout(api, cluster, body_b, **{"Idempotency-Key": key})
        assert during.status_code == 201, during.text
        assert during.json()["data"]["status"] == "pending", during.text
        assert during.json()["metadata"]["workflowStart"] == "pending", during.text
        rid_b = int(during.json()["data"]["id"])
        # The same request again under its key is the same rollout, not a second one.
        again = create_rollout(api, cluster, body_b, **{"Idempotency-Key": key})
        assert again.status_code == 201 and int(again.json()["data"]["id"]) == rid_b, again.text
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        cluster.start_temporal()
        back = time.monotonic()
        wait_until(
            lambda: rollout(api, cluster, rid_b)["status"] != "pending",
            within=120,
            what="the rollout created during the outage started by the reconcile",
        )
        started_b = time.monotonic() - back
        wait_until(
            lambda: cluster.one(
                "SELECT count(*) FROM rollout_targets WHERE rollout_id = %s AND stage = 1"
                " AND state <> 'planned'",
                (rid_a,),
            ),
            within=120,
            what="the wave of the baking rollout issued",
        )
        resumed = time.monotonic() - back
        final_a = vehicles.until_finished(rid_a, api, within=120)
        final_b = vehicles.until_finished(rid_b, api, within=120)
        rollouts = cluster.sql("SELECT id, status FROM rollouts ORDER BY id")
        assert api.get("/readyz").status_code == 200
    print(
        f"outage: readyz {ready.status_code}, telemetry {beat.status_code}, create "
        f"{during.status_code} pending in {took[0]:.1f} s, started {started_b:.1f} s after "
        f"Temporal was back; the bake resumed and the wave issued {resumed:.1f} s after "
        f"Temporal was back; rollouts {rollouts}"
    )
    assert ready.status_code == 503, ready.text
    assert read["status"] == "running", read
    assert beat.status_code == 202, beat.text
    assert final_a["status"] == "completed", final_a
    assert final_a["progress"]["succeeded"] == final_a["progress"]["targeted"] == 100
    assert final_b["status"] == "completed", final_b
    assert cluster.sql(
        "SELECT DISTINCT attempt FROM rollout_targets WHERE rollout_id = ANY(%s)",
        ([rid_a, rid_b],),
    ) == [(1,)]

    # Never stuck: no rollout left pending. Never doubled: one workflow per rollout that ran,
    # none for a failed one.
    assert "pending" not in {s for _, s in rollouts}, rollouts
    workflows = asyncio.run(_workflows(cluster.temporal_address, [r for r, _ in rollouts]))
    for rid, status in rollouts:
        expected = [] if status == "failed" else ["COMPLETED"]
        assert workflows[rid] == expected, (rid, status, workflows)
    # Every vehicle of the second rollout notified by exactly one rollout.
    notified = cluster.sql(
        "SELECT t.vehicle_id, count(*) FROM rollout_targets t"
        " JOIN vehicles v ON v.id = t.vehicle_id WHERE v.region = %s"
        " AND t.notified_at IS NOT NULL GROUP BY 1 HAVING count(*) <> 1",
        (REGION_B,),
    )
    assert notified == []
    assert (
        cluster.one(
            "SELECT count(DISTINCT t.vehicle_id) FROM rollout_targets t"
            " WHERE t.rollout_id = %s AND t.state = 'succeeded'",
            (rid_b,),
        )
        == 50
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
