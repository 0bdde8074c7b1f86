"""`motorcade simulate` against the real app: simulated vehicles poll their desired state,
report desired_notified, apply_start and ready (or failed), and heartbeat the new release;
at apply time they check the desired state's `constraints` (else their own defaults) and
report `blocked` with the reason, once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from core.auth import mint_dev_token
from core.settings import Settings
from devtools.simulate import (
    Constraints,
    Gateway,
    SimConfig,
    Stats,
    Vehicle,
    outcome_rng,
    simulate,
)
from models.enums import Role
from tests.api.telemetry import set_desired, vehicle_row
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
    insert_vehicles(database_url, ids, release="1.0", battery_percent=90)
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


# --- Safety checks at apply time ----------------------------------------------------------


def _window(opens_in: timedelta, *, zone: str = "UTC") -> dict[str, Any]:
    """A daily one-hour maintenance window (the desired state's camelCase JSON) that opens
    `opens_in` from now, in local time of `zone`."""
    start = datetime.now(UTC).astimezone(ZoneInfo(zone)) + opens_in
    end = start + timedelta(hours=1)
    return {"start": f"{start:%H:%M}", "end": f"{end:%H:%M}", "timezone": zone, "days": WEEK}


WEEK = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CLOSED = _window(timedelta(hours=2))
OPEN_IN_BERLIN = _window(timedelta(minutes=-30), zone="Europe/Berlin")


@pytest.mark.parametrize(
    ("constraints", "battery", "stationary", "expected"),
    [
        # No constraints (an old desired state): the simulator's own floor (30), parked.
        (None, 29, True, "BATTERY_LOW"),
        (None, 30, True, None),
        (None, 80, False, "NOT_STATIONARY"),
        ({}, 80, False, "NOT_STATIONARY"),
        # The desired state's checks win over the simulator's.
        ({"minBatteryPercent": 50}, 45, True, "BATTERY_LOW"),
        ({"minBatteryPercent": 10}, 20, True, None),
        ({"requireStationary": False}, 80, False, None),
        ({"requireStationary": True}, 80, False, "NOT_STATIONARY"),
        ({"minBatteryPercent": 50, "requireStationary": True}, 20, False, "BATTERY_LOW"),
        ({"maintenanceWindow": None}, 80, True, None),
        ({"maintenanceWindow": CLOSED}, 80, True, "OUTSIDE_MAINTENANCE_WINDOW"),
        ({"maintenanceWindow": OPEN_IN_BERLIN}, 80, True, None),
        (
            {"minBatteryPercent": 30, "requireStationary": False, "maintenanceWindow": CLOSED},
            80,
            False,
            "OUTSIDE_MAINTENANCE_WINDOW",
        ),
        (
            {"maintenanceWindow": {**OPEN_IN_BERLIN, "days": []}},
            80,
            True,
            "OUTSIDE_MAINTENANCE_WINDOW",
        ),
    ],
)
def test_constraints_at_apply_time(
    constraints: dict[str, Any] | None, battery: int, stationary: bool, expected: str | None
) -> None:
    checks = Constraints.read(constraints, default_min_battery=30)
    now = datetime.now(UTC)
    assert checks.blocking(battery=battery, stationary=stationary, now=now) == expected


@pytest.mark.parametrize(
    "constraints",
    [
        "no",
        {"maintenanceWindow": {"start": "25:00"}},
        {"maintenanceWindow": {"start": "01:00", "end": "02:00", "timezone": "Mars/Base"}},
    ],
)
def test_unreadable_constraints_are_refused(constraints: Any) -> None:
    with pytest.raises(ValueError):
        Constraints.read(constraints, default_min_battery=30)


def test_a_seeded_vehicle_draws_the_same_outcomes_in_every_run() -> None:
    draws = outcome_rng(7, "VIN-000042")
    first = [draws.random() for _ in range(4)]
    again = outcome_rng(7, "VIN-000042")
    assert [again.random() for _ in range(4)] == first
    assert outcome_rng(7, "VIN-000043").random() != first[0]
    assert outcome_rng(8, "VIN-000042").random() != first[0]


async def test_a_vehicle_outside_its_window_reports_blocked_once_then_applies(
    api_base_url: str, api_settings: Settings, database_url: str, prefix: str
) -> None:
    """A vehicle given a desired state whose window is closed reports `blocked`
    OUTSIDE_MAINTENANCE_WINDOW once, however often it checks again; once the check passes it
    applies."""
    vid = f"{prefix}WIN"
    insert_vehicles(database_url, [vid], release="1.0")
    ds = set_desired(database_url, vid, "2.0")
    key = api_settings.dev_key.get_secret_value()  # type: ignore[union-attr]
    config = _config(api_base_url, prefix)
    stats = Stats()
    async with httpx.AsyncClient(base_url=api_base_url, timeout=30) as client:
        gateway = Gateway(client, mint_dev_token(key, role=Role.GATEWAY), stats)
        vehicle = Vehicle(vid, "1.0", "unused", config, gateway, client, stats, random.Random(1))
        closed = Constraints.read({"maintenanceWindow": CLOSED}, default_min_battery=30)
        assert await vehicle.apply(ds, "2.0", closed) == "blocked"
        assert await vehicle.apply(ds, "2.0", closed) == "blocked"
        await _flush(gateway)
        assert _timeline(database_url, vid) == [
            ("desired_notified", None),
            ("blocked", "OUTSIDE_MAINTENANCE_WINDOW"),
        ]
        assert vehicle_row(database_url, vid)["status"] == "blocked"
        opened = Constraints.read({"maintenanceWindow": None}, default_min_battery=30)
        assert await vehicle.apply(ds, "2.0", opened) == "ready"
        await _flush(gateway)
    assert _timeline(database_url, vid)[2:] == [
        ("desired_notified", None),
        ("apply_start", None),
        ("ready", None),
    ]
    assert vehicle_row(database_url, vid)["status"] == "in_sync"
    assert stats.errors == 0


async def test_without_constraints_a_vehicle_keeps_its_own_battery_floor(
    api_base_url: str, api_settings: Settings, database_url: str, prefix: str
) -> None:
    """Today's desired state carries no `constraints`: the simulated fleet checks its own floor
    (here above any battery, so it never passes) and reports `blocked` BATTERY_LOW once per
    vehicle while it polls again and again."""
    ids = [f"{prefix}LOW{i}" for i in range(3)]
    insert_vehicles(database_url, ids, release="1.0")
    for vid in ids:
        set_desired(database_url, vid, "2.0")
    key = api_settings.dev_key.get_secret_value()  # type: ignore[union-attr]
    config = _config(api_base_url, prefix, duration=3.0)
    config.min_battery_percent = 101
    stats = await simulate(config, key)
    assert stats.errors == 0 and stats.polls >= 3 * len(ids)
    with psycopg.connect(database_url) as conn:
        kinds = conn.execute(
            "SELECT type, reason_code, count(*) FROM timeline_events WHERE vehicle_id LIKE %s"
            " GROUP BY 1, 2 ORDER BY 1",
            (prefix + "%",),
        ).fetchall()
    assert kinds == [("blocked", "BATTERY_LOW", 3), ("desired_notified", None, 3)]
    assert {vehicle_row(database_url, vid)["reason_codes"][0] for vid in ids} == {"BATTERY_LOW"}


async def _flush(gateway: Gateway) -> None:
    """Send what the gateway holds (its run loop ends once stopped and empty)."""
    stop = asyncio.Event()
    stop.set()
    await gateway.run(stop)


def _timeline(database_url: str, vid: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT type, reason_code FROM timeline_events WHERE vehicle_id = %s ORDER BY seq",
            (vid,),
        ).fetchall()
    return [(kind, reason) for kind, reason in rows]
