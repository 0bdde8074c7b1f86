"""`motorcade simulate` against the real app: simulated vehicles poll their desired state,
report desired_notified, apply_start and ready (or failed), and heartbeat the new release."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg

from core.settings import Settings
from devtools.simulate import SimConfig, simulate
from tests.api.telemetry import set_desired
from tests.api.test_releases_and_rollouts import rollout_body
from tests.api.test_rollout_control import wait_for_status
from tests.factories import insert_signed_release, insert_vehicles


def _config(api: str, prefix: str, **kw: float) -> SimConfig:
    base = {
        "failure_rate": 0.0,
        "low_battery_rate": 0.0,
        "moving_rate": 0.0,
        "network_loss_rate": 0.0,
        "offline_rate": 0.0,
        "heartbeat_seconds": 0.5,
        "poll_seconds": 0.3,
        "apply_seconds": 0.1,
        "duration": 4.0,
    }
    base.update(kw)
    return SimConfig(api=api, id_prefix=prefix, seed=7, **base)  # type: ignore[arg-type]


async def test_simulated_vehicles_update_and_report(
    api_base_url: str, api_settings: Settings, database_url: str, prefix: str
) -> None:
    ok = [f"{prefix}OK{i}" for i in range(6)]
    bad = [f"{prefix}BAD{i}" for i in range(3)]
    insert_vehicles(database_url, ok + bad, release="1.0")
    for vid in ok:
        set_desired(database_url, vid, "2.0")
    for vid in bad:
        set_desired(database_url, vid, "2.1")
    key = api_settings.dev_key.get_secret_value()  # type: ignore[union-attr]
    config = _config(api_base_url, prefix)
    config.release_failure_rates = {"2.1": 1.0}
    stats = await simulate(config, key)
    assert stats.overloaded == 0 and stats.errors == 0
    with psycopg.connect(database_url) as conn:
        rows: dict[str, str] = dict(
            conn.execute(
                "SELECT id, status || '/' || coalesce(actual_release_version, '-')"
                " || '/' || array_to_string(reason_codes, ',')"
                " FROM vehicles WHERE id LIKE %s",
                (prefix + "%",),
            ).fetchall()
        )
        kinds = conn.execute(
            "SELECT type, count(*) FROM timeline_events WHERE vehicle_id LIKE %s GROUP BY type",
            (prefix + "%",),
        ).fetchall()
    assert {rows[v] for v in ok} == {"in_sync/2.0/"}
    assert {rows[v] for v in bad} == {"failed/1.0/APPLY_FAILED"}
    assert dict(kinds) == {"desired_notified": 9, "apply_start": 9, "ready": 6, "failed": 3}


async def test_a_rollout_progresses_with_the_simulated_fleet(
    http: Any,
    operator: dict,
    viewer: dict,
    api_base_url: str,
    api_settings: Settings,
    database_url: str,
    prefix: str,
    signing_key: Any,
    rollout_worker: None,
) -> None:
    """The real workflow and worker, the real API, and simulated vehicles: the canary
    reports ready through POST /telemetry, the gate passes, the wave goes out, completed."""
    n = 6
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    insert_vehicles(database_url, ids, release="1.0")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE vehicles SET battery_percent = 90, stationary = true WHERE id = ANY(%s)",
            (ids,),
        )
    release = f"{prefix}2027.2.0"
    insert_signed_release(database_url, signing_key, release)
    body = rollout_body(
        release,
        targets={"vehicleIds": ids},
        strategy={
            "canary": {"size": 2, "bakeSeconds": 2},
            "waves": [{"percent": 100, "bakeSeconds": 1}],
        },
        gates={"canaryHealthy": {"minSuccessRate": 1.0, "minSamples": 2}},
    )
    created = await http.post("/api/v1/rollouts", headers=operator, json=body)
    assert created.status_code == 201, created.text
    rid = int(created.json()["data"]["id"])
    key = api_settings.dev_key.get_secret_value()  # type: ignore[union-attr]
    config = _config(api_base_url, prefix, duration=25.0)
    sim = asyncio.create_task(simulate(config, key))
    try:
        await wait_for_status(http, viewer, rid, "completed", within=25)
    finally:
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim
    with psycopg.connect(database_url) as conn:
        states = conn.execute(
            "SELECT state, count(*) FROM rollout_targets WHERE rollout_id = %s GROUP BY state",
            (rid,),
        ).fetchall()
        statuses = conn.execute(
            "SELECT status, actual_release_version, count(*) FROM vehicles WHERE id = ANY(%s)"
            " GROUP BY 1, 2",
            (ids,),
        ).fetchall()
    assert states == [("succeeded", n)]
    assert statuses == [("in_sync", release, n)]
