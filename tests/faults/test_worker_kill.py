"""The worker `SIGKILL`ed while it issues a stage of 12,000 vehicles; a new worker started.

Issuing goes in batches of 5,000, one transaction each; the activity heartbeats its cursor
after each batch, and the SDK sends the first heartbeat at once but throttles the next ones
(at most one per 80 % of the heartbeat timeout). The test makes the kill land where that
matters: it holds a lock on a vehicle of the third batch, so batches one and two commit
(batch two's heartbeat still held by the throttle) and batch three waits; then the worker is
killed (batch three rolls back with its connection). The new worker's retry resumes from the
cursor Temporal last received (after batch one), so it issues batch two AGAIN: what keeps
that harmless is that a batch only takes targets still `planned` (services/rollouts/issue.py).

Invariants afterwards: every target notified exactly once (attempt 1, one `notified_at`),
the rollout's counters equal its targets' states, one desired state per stage, every vehicle
pointing at its stage's desired state, one `ready` per vehicle stored; the rollout completes.
"""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest
from temporalio.client import Client

from core.temporal import rollout_workflow_id
from services.rollouts.issue import target_set_desired_state_id
from tests.faults.cluster import Cluster, wait_until
from tests.faults.conftest import Vehicles, create_rollout, fleet, rollout_body, signed_release

pytestmark = pytest.mark.slow

CANARY = 10
WAVE = 12_000
BATCH = 5_000
REGION = "faults-kill"


def _issued(cluster: Cluster, rollout_id: int, stage: int) -> int:
    return int(
        cluster.one(
            "SELECT count(*) FROM rollout_targets WHERE rollout_id = %s AND stage = %s"
            " AND state <> 'planned'",
            (rollout_id, stage),
        )
    )


def _lock_waiters(cluster: Cluster) -> int:
    return int(
        cluster.one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
    )


async def _last_heartbeat(address: str, rollout_id: int) -> tuple[int, str | None]:
    """The issuing activity's attempt and the cursor of the last heartbeat Temporal holds."""
    client = await Client.connect(address)
    description = await client.get_workflow_handle(rollout_workflow_id(rollout_id)).describe()
    pending = [
        a
        for a in description.raw_description.pending_activities
        if a.activity_type.name == "issue_stage"
    ]
    assert pending, "no issuing activity is pending"
    details = pending[0].heartbeat_details.payloads
    cursor = None
    if details:
        cursor = json.loads(details[0].data).get("last_vehicle_id")
    return pending[0].attempt, cursor


def test_a_worker_killed_while_issuing_notifies_every_vehicle_once(cluster: Cluster) -> None:
    cluster.add_api()
    cluster.add_ingest()
    cluster.add_worker("worker-1")
    cluster.add_worker("worker-2")
    for name in ("api", "ingest", "worker-1"):
        cluster.start(name)
    release = signed_release(cluster)
    ids = fleet(cluster, "FK", CANARY + WAVE, REGION)
    with cluster.client("api") as api, cluster.client("ingest") as ingest:
        vehicles = Vehicles(cluster, ingest)
        created = create_rollout(api, cluster, rollout_body(REGION, release=release, canary=CANARY))
        assert created.status_code == 201, created.text
        rid = int(created.json()["data"]["id"])
        wait_until(
            lambda: (
                cluster.one("SELECT count(*) FROM rollout_targets WHERE rollout_id = %s", (rid,))
                == CANARY + WAVE
            ),
            within=60,
            what="targets expanded",
        )
        wave = [
            vid
            for (vid,) in cluster.sql(
                "SELECT vehicle_id FROM rollout_targets WHERE rollout_id = %s AND stage = 1"
                " ORDER BY vehicle_id",
                (rid,),
            )
        ]
        assert len(wave) == WAVE
        # Hold a vehicle of the wave's third batch: batches one and two commit, three waits.
        holder = psycopg.connect(cluster.database_url)
        try:
            holder.execute("SELECT 1 FROM vehicles WHERE id = %s FOR UPDATE", (wave[2 * BATCH],))
            # The canary answers; it settles and bakes (1 s); the wave's issuing starts.
            wait_until(lambda: _issued(cluster, rid, 0) == CANARY, within=60, what="canary")
            vehicles.answer(rid)
            wait_until(
                lambda: _issued(cluster, rid, 1) == 2 * BATCH and _lock_waiters(cluster) > 0,
                within=90,
                what="batches one and two committed, three waiting",
            )
            attempt, cursor = asyncio.run(_last_heartbeat(cluster.temporal_address, rid))
            cluster["worker-1"].kill()
            killed_at = time.monotonic()
        finally:
            holder.close()
        # What Temporal knows is behind what the database holds: batch two runs again.
        assert attempt == 1 and cursor == wave[BATCH - 1], (attempt, cursor)
        cluster.start("worker-2")
        wait_until(
            lambda: _issued(cluster, rid, 1) == WAVE, within=240, what="the wave issued in full"
        )
        resumed = time.monotonic() - killed_at
        final = vehicles.until_finished(rid, api, within=120)
    print(f"issuing resumed {resumed:.1f} s after the kill; POSTs by status {vehicles.posts}")

    assert final["status"] == "completed", final
    progress = final["progress"]
    assert progress["targeted"] == progress["succeeded"] == CANARY + WAVE, progress
    # Every target notified exactly once: one attempt, by its stage's desired state.
    by_state = cluster.sql(
        "SELECT stage, state, attempt, desired_state_id::text, count(*) FROM rollout_targets"
        " WHERE rollout_id = %s GROUP BY 1, 2, 3, 4 ORDER BY 1",
        (rid,),
    )
    stage_ds = {s: str(target_set_desired_state_id(rid, f"stage:{s}")) for s in (0, 1)}
    assert by_state == [
        (0, "succeeded", 1, stage_ds[0], CANARY),
        (1, "succeeded", 1, stage_ds[1], WAVE),
    ], by_state
    # The rollout's counters equal its targets: nothing counted twice.
    counters = cluster.one(
        "SELECT targeted, notified, succeeded, failed, blocked FROM rollouts WHERE id = %s",
        (rid,),
    )
    assert counters == (CANARY + WAVE, CANARY + WAVE, CANARY + WAVE, 0, 0), counters
    # One desired state per stage, and every vehicle on its stage's.
    assert cluster.sql(
        "SELECT id::text FROM desired_states WHERE rollout_id = %s ORDER BY reason", (rid,)
    ) == [(stage_ds[0],), (stage_ds[1],)]
    on = cluster.sql(
        "SELECT desired_state_id::text, desired_release_version, rollout_id, count(*)"
        " FROM vehicles WHERE region = %s GROUP BY 1, 2, 3 ORDER BY 1",
        (REGION,),
    )
    assert sorted(on) == sorted(
        [(stage_ds[0], release, rid, CANARY), (stage_ds[1], release, rid, WAVE)]
    ), on
    # Each vehicle answered once (the test sent one `ready` per notified target).
    assert len(vehicles.answered) == len(ids) and set(vehicles.seqs.values()) == {1}
    assert cluster.one(
        "SELECT count(*) FROM timeline_events WHERE vehicle_id LIKE %s AND type = 'ready'",
        ("FK%",),
    ) == len(ids)
    assert vehicles.posts.keys() == {202}
