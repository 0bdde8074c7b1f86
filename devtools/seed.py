"""The sample fleet (SPEC.md, `make dev`, `motorcade seed --vehicles N`).

Vehicles arrive through one binary COPY (psycopg 3 `cursor.copy`), their desired-state rows
through one server-side `INSERT ... SELECT` from them, all in a single transaction; into empty
tables the secondary indexes are dropped first and built once at the end. A million vehicles
take about a minute. Every vehicle is `in_sync` on the oldest sample release; the newer
releases are signed with the dev release-signing key and ready to roll out. Each has a last
heartbeat that passes the fleet's default safety checks (seen within the last two minutes,
parked, battery 40-100 %), so a rollout started right after seeding notifies them; the
simulator's heartbeats (`motorcade simulate`) take over from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from core.settings import libpq_url
from models.enums import VehicleStatus
from services.fleet import refresh_fleet_counts_now
from services.signing import load_or_create_signing_key, sign_release, write_trusted_keys_file

SIGNING_KEY_FILE = "dev-release-signing-key.pem"
TRUSTED_KEYS_FILE = "trusted-keys.json"
SEED_ACTOR = "seed"
# pg_advisory_xact_lock key: two concurrent seeds of one database never both insert.
_SEED_LOCK_KEY = 0x4D6F746F72636164  # "Motorcad"

MODELS = ("atlas", "borealis", "corsa", "dune")
REGIONS = ("eu-west", "eu-north", "us-east", "us-west", "apac")
# (ring, cumulative share)
RINGS = (("canary", 0.05), ("early", 0.30), ("broad", 1.0))
ORGS = (("default", 0.97), ("nordic-logistics", 1.0))
MODEL_YEARS = (2022, 2023, 2024, 2025, 2026)


@dataclass(frozen=True)
class SampleRelease:
    version: str
    components: list[dict[str, str]]
    notes: str
    age_days: int

    @property
    def artifact_digest(self) -> str:
        payload = json.dumps([self.version, self.components], sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(b"motorcade-sample-artifact:" + payload).hexdigest()


SAMPLE_RELEASES: tuple[SampleRelease, ...] = (
    SampleRelease(
        "2026.09.0",
        [
            {"name": "adas", "version": "4.2.0"},
            {"name": "infotainment", "version": "11.0.3"},
            {"name": "gateway-fw", "version": "2.8.1"},
        ],
        "Sample release: what the seeded fleet runs.",
        90,
    ),
    SampleRelease(
        "2026.10.1",
        [
            {"name": "adas", "version": "4.3.1"},
            {"name": "infotainment", "version": "11.1.0"},
            {"name": "gateway-fw", "version": "2.8.1"},
        ],
        "Sample release: ADAS and infotainment fixes.",
        45,
    ),
    SampleRelease(
        "2026.11.0",
        [
            {"name": "adas", "version": "4.4.0"},
            {"name": "infotainment", "version": "12.0.0"},
            {"name": "gateway-fw", "version": "2.9.0"},
            {"name": "battery-mgmt", "version": "1.6.2"},
        ],
        "Sample release: ready to roll out.",
        7,
    ),
)
BASELINE_RELEASE = SAMPLE_RELEASES[0].version


@dataclass(frozen=True)
class SeedResult:
    vehicles_inserted: int
    releases_inserted: int
    seconds: float
    vehicles_per_second: float
    skipped: bool


def vehicle_id(index: int, width: int = 6) -> str:
    """`VIN-000001`, ... (1-based, zero-padded to `width`)."""
    return f"VIN-{index:0{width}d}"


def id_width(vehicles: int) -> int:
    return max(6, len(str(vehicles)))


def seed_releases(
    conn: psycopg.Connection[Any], *, state_dir: Path, now: datetime | None = None
) -> int:
    """Insert the sample releases (existing versions are kept), signed with the dev release
    key at `state_dir/dev-release-signing-key.pem`, whose public key is added to
    `state_dir/trusted-keys.json`. Runs in the caller's transaction; returns rows inserted."""
    key = load_or_create_signing_key(Path(state_dir) / SIGNING_KEY_FILE)
    write_trusted_keys_file(Path(state_dir) / TRUSTED_KEYS_FILE, [key.public_key()])
    now = now or datetime.now(UTC)
    inserted = 0
    with conn.cursor() as cur:
        for release in SAMPLE_RELEASES:
            signature, kid = sign_release(
                key, release.version, release.artifact_digest, release.components
            )
            cur.execute(
                "INSERT INTO releases (version, components, artifact_digest, signature,"
                " signing_key_id, notes, created_by, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (version) DO NOTHING",
                (
                    release.version,
                    Jsonb(release.components),
                    release.artifact_digest,
                    signature,
                    kid,
                    release.notes,
                    SEED_ACTOR,
                    now - timedelta(days=release.age_days),
                ),
            )
            inserted += cur.rowcount
    return inserted


_VEHICLE_COLUMNS = (
    ("id", "text"),
    ("model", "text"),
    ("region", "text"),
    ("ring", "text"),
    ("org", "text"),
    ("metadata", "jsonb"),
    ("desired_release_version", "text"),
    ("desired_state_id", "uuid"),
    ("actual_release_version", "text"),
    ("status", "text"),
    ("last_seen_at", "timestamptz"),
    ("battery_percent", "int2"),
    ("stationary", "bool"),
)


def _copy_vehicles(
    conn: psycopg.Connection[Any], *, vehicles: int, seed: int, release: str, now: datetime
) -> None:
    """One binary COPY of `vehicles` rows. Attributes come from `random.Random(seed)`, so the
    same seed gives the same fleet; desired-state ids are random (unique per run)."""
    rng = random.Random(seed)
    rand = rng.random
    width = id_width(vehicles)
    # Desired-state ids: a random version-4 base whose low 32 bits count the vehicles.
    base = int.from_bytes(os.urandom(16), "big") & ~0xFFFFFFFF
    # last_seen_at jitter: up to 2 minutes back, in 100 ms steps (precomputed datetimes).
    seen = [now - timedelta(milliseconds=100 * step) for step in range(1200)]
    n_models, n_regions, n_seen, n_years = len(MODELS), len(REGIONS), len(seen), len(MODEL_YEARS)
    (canary, canary_share), (early, early_share), (broad, _) = RINGS
    (org_main, org_main_share), (org_other, _) = ORGS
    in_sync = VehicleStatus.IN_SYNC.value
    columns = ", ".join(name for name, _ in _VEHICLE_COLUMNS)
    with (
        conn.cursor() as cur,
        cur.copy(f"COPY vehicles ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([kind for _, kind in _VEHICLE_COLUMNS])
        write_row = copy.write_row
        for index in range(1, vehicles + 1):
            model_index = int(rand() * n_models)
            model = MODELS[model_index]
            r = rand()
            ring = canary if r < canary_share else early if r < early_share else broad
            year = MODEL_YEARS[int(rand() * n_years)]
            vid = vehicle_id(index, width)
            metadata = f'{{"vin":"MCD{model_index}{year % 100:02d}{index:011d}","year":{year}}}'
            write_row(
                (
                    vid,
                    model,
                    REGIONS[int(rand() * n_regions)],
                    ring,
                    org_main if rand() < org_main_share else org_other,
                    Jsonb(metadata, dumps=_as_is),
                    release,
                    uuid.UUID(int=base + index, version=4),
                    release,
                    in_sync,
                    seen[int(rand() * n_seen)],
                    40 + int(rand() * 61),
                    True,
                )
            )


def _as_is(text: Any) -> str:
    return str(text)


# Below this many rows, maintaining the indexes row by row is cheaper than rebuilding them.
DEFER_INDEXES_FROM = 20_000


@contextmanager
def _indexes_deferred(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> Iterator[None]:
    """Drop the secondary (non-constraint) indexes of empty `tables`, and build them again on
    exit: a bulk load then builds each index once, sorted, instead of row by row. Runs inside
    the caller's transaction (PostgreSQL DDL is transactional: an error restores them)."""
    rows = conn.execute(
        "SELECT i.schemaname, i.indexname, i.indexdef FROM pg_indexes i"
        " WHERE i.schemaname = current_schema() AND i.tablename = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname"
        "   AND c.connamespace = i.schemaname::regnamespace)",
        (list(tables),),
    ).fetchall()
    for schema, index, _ in rows:
        conn.execute(
            sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(schema), sql.Identifier(index))
        )
    yield
    conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
    for _, _, definition in rows:
        conn.execute(definition)


def seed_fleet(
    database_url: str,
    *,
    vehicles: int,
    state_dir: Path,
    seed: int = 42,
    only_if_empty: bool = True,
) -> SeedResult:
    """Seed the sample releases and `vehicles` vehicles, all `in_sync` on the oldest release,
    each with its desired-state row, plus one audit entry, in one transaction.

    With `only_if_empty` (the default), a database that already has vehicles is left alone
    (`skipped=True`); the dev signing key and trusted-keys file are still ensured. Without it,
    vehicle ids that already exist make the COPY fail (and nothing is written).
    """
    if vehicles < 0:
        raise ValueError("vehicles must be >= 0")
    started = time.perf_counter()
    now = datetime.now(UTC)
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK_KEY,))
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM vehicles)").fetchone()
        if only_if_empty and row and row[0]:
            key = load_or_create_signing_key(Path(state_dir) / SIGNING_KEY_FILE)
            write_trusted_keys_file(Path(state_dir) / TRUSTED_KEYS_FILE, [key.public_key()])
            conn.rollback()
            return SeedResult(0, 0, time.perf_counter() - started, 0.0, skipped=True)

        releases_inserted = seed_releases(conn, state_dir=state_dir, now=now)
        if vehicles:
            states = conn.execute("SELECT EXISTS (SELECT 1 FROM desired_states)").fetchone()
            empty = not (row and row[0]) and not (states and states[0])
            deferred = empty and vehicles >= DEFER_INDEXES_FROM
            with (
                _indexes_deferred(conn, ("vehicles", "desired_states"))
                if deferred
                else nullcontext()
            ):
                _copy_vehicles(
                    conn, vehicles=vehicles, seed=seed, release=BASELINE_RELEASE, now=now
                )
                width = id_width(vehicles)
                conn.execute(
                    "INSERT INTO desired_states (id, vehicle_id, release_version, reason,"
                    " created_by, created_at)"
                    " SELECT desired_state_id, id, desired_release_version, 'seed', %s, %s"
                    " FROM vehicles WHERE id BETWEEN %s AND %s AND desired_state_id IS NOT NULL",
                    (SEED_ACTOR, now, vehicle_id(1, width), vehicle_id(vehicles, width)),
                )
        payload = {
            "vehicles": vehicles,
            "releases": releases_inserted,
            "seed": seed,
            "baselineRelease": BASELINE_RELEASE,
            "releaseVersions": [r.version for r in SAMPLE_RELEASES],
        }
        conn.execute(
            "INSERT INTO audit_log (actor, role, source, action, target_type, target_id,"
            " payload, result) VALUES (%s, NULL, 'system', 'fleet.seeded', 'fleet', NULL,"
            " %s, 'ok')",
            (SEED_ACTOR, Jsonb(payload)),
        )
        conn.commit()
        if vehicles:
            conn.execute("ANALYZE vehicles")
            conn.execute("ANALYZE desired_states")
            conn.commit()
    seconds = time.perf_counter() - started
    if vehicles:  # the fleet summary has counts at once, not only after the first reconcile
        with psycopg.connect(libpq_url(database_url)) as conn:
            refresh_fleet_counts_now(conn)
            conn.commit()
    return SeedResult(
        vehicles_inserted=vehicles,
        releases_inserted=releases_inserted,
        seconds=seconds,
        vehicles_per_second=vehicles / seconds if seconds > 0 else 0.0,
        skipped=False,
    )
