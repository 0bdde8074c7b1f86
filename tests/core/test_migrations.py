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
