"""The audit log is append-only: UPDATE is always refused, DELETE is refused except inside the
retention purge's own transaction (migration 0007), which still deletes what it should."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from services import audit
from tests.factories import Sessions

# Nothing else in the suite writes entries this old, so the purge below touches only these.
ANCIENT = "2000-01-01T00:00:00Z"
KEPT = "2010-01-01T00:00:00Z"
RETENTION_DAYS = 365 * 20  # cutoff: about 2006


def insert(database_url: str, actor: str, at: str, n: int) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO audit_log (at, actor, source, action, target_type, result)"
            " SELECT %s, %s, 'system', 'test.retention', 'test', 'ok' FROM generate_series(1, %s)",
            (at, actor, n),
        )


def count(database_url: str, actor: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM audit_log WHERE actor = %s", (actor,)).fetchone()
    assert row is not None
    return int(row[0])


def test_update_and_delete_are_refused_outside_the_purge(database_url: str) -> None:
    actor = f"keep-{uuid.uuid4().hex}"
    insert(database_url, actor, "now", 1)
    with psycopg.connect(database_url) as conn:
        for statement in (
            "DELETE FROM audit_log WHERE actor = %s",
            "UPDATE audit_log SET reason = 'x' WHERE actor = %s",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement, (actor,))
            conn.rollback()
        # The purge's setting is transaction-local: it does not outlive its transaction.
        conn.execute("SELECT set_config(%s, 'on', true)", (audit.PURGE_SETTING,))
        conn.commit()
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE actor = %s", (actor,))
        conn.rollback()
        # Even inside a purge's transaction, UPDATE stays refused.
        conn.execute("SELECT set_config(%s, 'on', true)", (audit.PURGE_SETTING,))
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE audit_log SET reason = 'x' WHERE actor = %s", (actor,))
        conn.rollback()
    assert count(database_url, actor) == 1


async def test_the_purge_is_the_path_that_deletes_in_batches(
    database_url: str, sessions: Sessions
) -> None:
    old, recent = f"old-{uuid.uuid4().hex}", f"recent-{uuid.uuid4().hex}"
    insert(database_url, old, ANCIENT, 5)
    insert(database_url, recent, KEPT, 2)

    deleted = await audit.purge_expired(sessions, retention_days=RETENTION_DAYS, batch=2)

    assert deleted == 5  # three transactions: 2, 2, 1
    assert count(database_url, old) == 0
    assert count(database_url, recent) == 2
