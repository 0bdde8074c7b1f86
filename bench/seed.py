"""Seeding speed: the binary-COPY seed (`devtools.seed.seed_fleet`) against row-by-row inserts.

    .venv/bin/python bench/seed.py [--vehicles 100000] [--baseline-vehicles 2000]

Uses the PostgreSQL server at MOTORCADE_DATABASE_URL, else an embedded one under
.motorcade/bench-pgdata. Every measurement runs in a fresh, migrated database of its own,
dropped at the end. Prints figures; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine
from sqlmodel import Session

from core.migrate import upgrade
from core.settings import normalize_database_url
from devtools import localservers
from devtools.seed import BASELINE_RELEASE, MODELS, REGIONS, seed_fleet
from models.tables import DesiredState, Vehicle


def _rows(count: int) -> list[tuple[str, str, str, str, dict, uuid.UUID, int]]:
    rng = random.Random(1)
    return [
        (
            f"VIN-{i:06d}",
            rng.choice(MODELS),
            rng.choice(REGIONS),
            rng.choice(("canary", "early", "broad")),
            {"vin": f"MCD{i:014d}", "year": 2024},
            uuid.uuid4(),
            40 + rng.randrange(61),
        )
        for i in range(1, count + 1)
    ]


def baseline_psycopg(url: str, count: int) -> float:
    """One INSERT statement per vehicle and one per desired state, one transaction."""
    rows, now = _rows(count), datetime.now(UTC)
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for vid, model, region, ring, metadata, state_id, battery in rows:
            cur.execute(
                "INSERT INTO desired_states (id, vehicle_id, release_version, reason,"
                " created_by) VALUES (%s, %s, %s, 'seed', 'seed')",
                (state_id, vid, BASELINE_RELEASE),
            )
            cur.execute(
                "INSERT INTO vehicles (id, model, region, ring, org, metadata,"
                " desired_release_version, desired_state_id, actual_release_version, status,"
                " last_seen_at, battery_percent, stationary)"
                " VALUES (%s, %s, %s, %s, 'default', %s, %s, %s, %s, 'in_sync', %s, %s, true)",
                (
                    vid,
                    model,
                    region,
                    ring,
                    Jsonb(metadata),
                    BASELINE_RELEASE,
                    state_id,
                    BASELINE_RELEASE,
                    now,
                    battery,
                ),
            )
        conn.commit()
    return time.perf_counter() - started


def baseline_orm(url: str, count: int) -> float:
    """SQLAlchemy ORM: session.add + flush per vehicle (and its desired state)."""
    rows, now = _rows(count), datetime.now(UTC)
    engine = create_engine(normalize_database_url(url))
    started = time.perf_counter()
    with Session(engine) as session:
        for vid, model, region, ring, metadata, state_id, battery in rows:
            session.add(
                DesiredState(
                    id=state_id,
                    vehicle_id=vid,
                    release_version=BASELINE_RELEASE,
                    reason="seed",
                    created_by="seed",
                )
            )
            session.add(
                Vehicle(
                    id=vid,
                    model=model,
                    region=region,
                    ring=ring,
                    org="default",
                    metadata_=metadata,
                    desired_release_version=BASELINE_RELEASE,
                    desired_state_id=state_id,
                    actual_release_version=BASELINE_RELEASE,
                    status="in_sync",
                    reason_codes=[],
                    last_seen_at=now,
                    battery_percent=battery,
                    stationary=True,
                )
            )
            session.flush()
        session.commit()
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=100_000)
    parser.add_argument("--baseline-vehicles", type=int, default=2_000)
    args = parser.parse_args()

    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    created: list[str] = []

    def fresh() -> str:
        name = f"motorcade_bench_{secrets.token_hex(4)}"
        url = localservers.ensure_database(server, name)
        created.append(name)
        upgrade(url)
        return url

    results: list[tuple[str, int, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="motorcade-bench-") as state_dir:
            result = seed_fleet(fresh(), vehicles=args.vehicles, state_dir=Path(state_dir))
        results.append(("seed_fleet (binary COPY)", args.vehicles, result.seconds))
        baselines: list[tuple[str, Callable[[str, int], float]]] = [
            ("row by row: psycopg execute", baseline_psycopg),
            ("row by row: ORM add + flush", baseline_orm),
        ]
        for label, run in baselines:
            results.append((label, args.baseline_vehicles, run(fresh(), args.baseline_vehicles)))
    finally:
        for name in created:
            localservers.drop_database(server, name)

    seed_rate = results[0][1] / results[0][2]
    print(f"\nSeeding vehicles (each with its desired-state row) on {psycopg_version(server)}\n")
    print(f"{'path':<30} {'vehicles':>10} {'seconds':>9} {'vehicles/s':>12} {'seed x':>8}")
    print("-" * 73)
    for label, count, seconds in results:
        rate = count / seconds
        print(f"{label:<30} {count:>10,} {seconds:>9.2f} {rate:>12,.0f} {seed_rate / rate:>8.1f}")
    print(f"\nAt the seed's rate, 1,000,000 vehicles take about {1_000_000 / seed_rate:.0f} s.")


def psycopg_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


if __name__ == "__main__":
    main()
