"""vehicle_status_keys (migration 0010) stays equal to the statuses in `vehicles` whoever
writes: inserts (one row, many, COPY), status changes, other updates, deletes, a truncate;
and the upgrade fills it from the vehicles already there. A fresh database of its own."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from core import localservers
from core.migrate import downgrade, upgrade


@pytest.fixture
def url(database_server_url: str) -> Iterator[str]:
    name = f"motorcade_keys_{secrets.token_hex(4)}"
    url = localservers.ensure_database(database_server_url, name)
    try:
        yield url
    finally:
        localservers.drop_database(database_server_url, name)


def keys_match(conn: psycopg.Connection) -> tuple[list[tuple[str, str]], int]:
    """(keys without their vehicle or with another status, vehicles without a key), and the
    key count."""
    wrong = conn.execute(
        "SELECT k.status, k.id FROM vehicle_status_keys k"
        " LEFT JOIN vehicles v ON v.id = k.id AND v.status = k.status WHERE v.id IS NULL"
        " UNION ALL SELECT v.status, v.id FROM vehicles v"
        " WHERE NOT EXISTS (SELECT FROM vehicle_status_keys k"
        "  WHERE k.id = v.id AND k.status = v.status)"
    ).fetchall()
    count = conn.execute("SELECT count(*) FROM vehicle_status_keys").fetchone()
    return [(r[0], r[1]) for r in wrong], int(count[0]) if count else -1


def add(conn: psycopg.Connection, ids: list[str], status: str = "pending") -> None:
    conn.execute(
        "INSERT INTO vehicles (id, model, region, ring, status)"
        " SELECT i, 'atlas', 'eu-west', 'canary', %s FROM unnest(%s::text[]) AS i",
        [status, ids],
    )


def test_keys_follow_every_write(url: str) -> None:
    downgrade_target = "0009"
    upgrade(url)
    downgrade(url, downgrade_target)
    with psycopg.connect(url, autocommit=True) as conn:
        add(conn, ["OLD-1", "OLD-2"], "failed")  # before the table exists
    upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert keys_match(conn) == ([], 2)  # the upgrade filled it

        add(conn, ["A"])
        add(conn, [f"B{i:03d}" for i in range(200)], "in_sync")
        with conn.cursor().copy("COPY vehicles (id, model, region, ring, status) FROM STDIN") as cp:
            for i in range(50):
                cp.write_row((f"C{i:02d}", "corsa", "us-east", "broad", "updating"))
        assert keys_match(conn) == ([], 253)

        conn.execute("UPDATE vehicles SET status = 'failed' WHERE id LIKE 'B0%'")
        conn.execute("UPDATE vehicles SET status = status WHERE id LIKE 'C%'")  # no change
        conn.execute("UPDATE vehicles SET region = 'apac' WHERE id = 'A'")  # another column
        with conn.transaction():
            conn.execute("UPDATE vehicles SET status = 'blocked' WHERE id = 'A'")
            conn.execute("UPDATE vehicles SET status = 'offline' WHERE id = 'OLD-1'")
            conn.execute("UPDATE vehicles SET status = 'in_sync' WHERE id = 'OLD-1'")
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute("UPDATE vehicles SET status = 'offline' WHERE id LIKE 'B1%'")
            conn.execute("SELECT 1 / 0")  # rolled back: the keys with it
        assert keys_match(conn) == ([], 253)
        failed = conn.execute(
            "SELECT count(*) FROM vehicle_status_keys WHERE status = 'failed'"
        ).fetchone()
        assert failed is not None and failed[0] == 100 + 1  # B000-B099 and OLD-2

        conn.execute("DELETE FROM vehicles WHERE id LIKE 'C1%' OR id = 'OLD-2'")
        assert keys_match(conn) == ([], 242)

        conn.execute("TRUNCATE vehicles CASCADE")
        assert keys_match(conn) == ([], 0)
