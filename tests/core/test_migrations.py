"""Migrations go up and down on a real PostgreSQL, and match the SQLModel tables."""

from __future__ import annotations

import json
import secrets
import uuid

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import models.tables  # noqa: F401
from core.migrate import downgrade, upgrade
from core.settings import normalize_database_url
from devtools import localservers


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_upgrade_downgrade_upgrade(database_server_url: str) -> None:
    name = f"motorcade_mig_{secrets.token_hex(4)}"
    url = localservers.ensure_database(database_server_url, name)
    try:
        upgrade(url)
        tables = _tables(url)
        assert {"vehicles", "rollouts", "rollout_targets", "audit_log", "change_feed"} <= tables
        assert "timeline_events_p00" in tables and "timeline_events_p15" in tables
        downgrade(url, "base")
        assert _tables(url) == {"alembic_version"}
        upgrade(url)
        assert _tables(url) == tables
    finally:
        localservers.drop_database(database_server_url, name)


def test_migrations_match_models(database_url: str) -> None:
    engine = create_engine(normalize_database_url(database_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()

    # Partitions (and their indexes) are created by the migration, not in the metadata.
    def on_partition(item: object) -> bool:
        table = getattr(item, "table", item)
        return str(getattr(table, "name", "")).startswith("timeline_events_p")

    meaningful = [d for d in diff if not (isinstance(d, tuple) and on_partition(d[1]))]
    assert meaningful == []


def test_audit_log_refuses_update(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO audit_log (actor, source, action, target_type, result) "
            "VALUES ('t', 'system', 'test', 'test', 'ok')"
        )
        try:
            conn.execute("UPDATE audit_log SET actor = 'x'")
        except psycopg.errors.RaiseException as exc:
            assert "append-only" in str(exc)
        else:
            raise AssertionError("an UPDATE of audit_log was accepted")
        conn.rollback()


def test_0012_gives_rollout_desired_states_their_rollout_constraints(
    database_server_url: str,
) -> None:
    """A rollout's target-set desired states written before 0012 get its stored safety checks
    (the fleet default for a missing one); a direct desired state has none (its checks were
    only audited). Downgrading drops the column."""
    name = f"motorcade_mig_{secrets.token_hex(4)}"
    url = localservers.ensure_database(database_server_url, name)
    window = {"start": "01:00", "end": "05:00", "timezone": "UTC", "days": ["mon"]}
    try:
        upgrade(url, "0011")
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO rollouts (id, release_version, targets, strategy, gates, status,"
                " created_by) OVERRIDING SYSTEM VALUE VALUES"
                " (1, '2.0', '{}', '{}', %s, 'running', 't'), (2, '2.0', '{}', '{}', '{}',"
                " 'running', 't')",
                (
                    json.dumps(
                        {"safetyChecks": {"minBatteryPercent": 50, "maintenanceWindow": window}}
                    ),
                ),
            )
            conn.execute(
                "INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,"
                " created_by) VALUES (%s, NULL, '2.0', 1, 't'), (%s, NULL, '2.0', 2, 't'),"
                " (%s, 'v1', '2.0', NULL, 't')",
                (str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), str(uuid.UUID(int=3))),
            )
        upgrade(url)
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT constraints FROM desired_states ORDER BY id").fetchall()
        assert [r[0] for r in rows] == [
            {"minBatteryPercent": 50, "requireStationary": True, "maintenanceWindow": window},
            {"minBatteryPercent": 30, "requireStationary": True, "maintenanceWindow": None},
            None,
        ]
        downgrade(url, "0011")
        with psycopg.connect(url) as conn:
            columns = conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'desired_states' AND column_name = 'constraints'"
            ).fetchall()
        assert columns == []
    finally:
        localservers.drop_database(database_server_url, name)


def test_0013_brings_a_future_last_seen_back_and_orders_by_epoch(
    database_server_url: str,
) -> None:
    """A vehicle frozen online by a heartbeat dated 2099 before 0013 is brought back to the
    migration's time (both rows), so it can go offline; a narrow row's values keep their
    order (`heartbeat_at` from `last_seen_at`); stored events are epoch 0. Down again drops
    the columns and restores the `(vehicle_id, seq)` index."""
    name = f"motorcade_mig_{secrets.token_hex(4)}"
    url = localservers.ensure_database(database_server_url, name)
    try:
        upgrade(url, "0012")
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO vehicles (id, model, region, ring, last_seen_at) VALUES"
                " ('frozen', 'm', 'r', 'g', '2099-01-01Z'),"
                " ('honest', 'm', 'r', 'g', '2026-01-01Z')"
            )
            conn.execute(
                "INSERT INTO vehicle_telemetry (vehicle_id, last_seen_at) VALUES"
                " ('frozen', '2099-01-01Z'), ('honest', '2026-01-01Z')"
            )
            conn.execute(
                "INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at)"
                " VALUES ('honest', %s, 7, 'ready', now())",
                (str(uuid.UUID(int=1)),),
            )
        upgrade(url)
        with psycopg.connect(url) as conn:
            wide = conn.execute(
                "SELECT id, last_seen_at <= now(), last_event_epoch FROM vehicles ORDER BY id"
            ).fetchall()
            narrow = conn.execute(
                "SELECT vehicle_id, last_seen_at <= now(), heartbeat_at = last_seen_at"
                " FROM vehicle_telemetry ORDER BY vehicle_id"
            ).fetchall()
            epochs = conn.execute("SELECT epoch FROM timeline_events").fetchall()
        assert wide == [("frozen", True, 0), ("honest", True, 0)]
        assert narrow == [("frozen", True, True), ("honest", True, True)]
        assert epochs == [(0,)]
        downgrade(url, "0012")
        with psycopg.connect(url) as conn:
            indexes = conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'timeline_events'"
                " AND indexname LIKE 'ix_%'"
            ).fetchall()
        assert indexes == [("ix_timeline_vehicle_seq",)]
    finally:
        localservers.drop_database(database_server_url, name)
