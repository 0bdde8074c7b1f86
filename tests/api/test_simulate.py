"""`motorcade simulate` against the real app: simulated vehicles poll their desired state,
report desired_notified, apply_start and ready (or failed), and heartbeat the new release."""

from __future__ import annotations

import psycopg

from core.settings import Settings
from core.simulate import SimConfig, simulate
from tests.api.conftest import insert_vehicles
from tests.api.test_telemetry import set_desired


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
