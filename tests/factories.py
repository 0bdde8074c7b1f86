"""Rows for the tests: vehicles, releases and rollouts, written with plain SQL as the API (or
a device) would leave them, under a unique id prefix so every assertion reads only its own
test's rows.

Two ways in, by what a test holds:
- a session factory (`Sessions`, async): `make_fleet`, `make_release`, `make_rollout`,
  `add_vehicles`, and `fetch_all` / `fetch_one` / `stage_vehicles` to read back;
- a database URL (psycopg, sync; the API tests): `insert_vehicles`, `insert_release`,
  `insert_signed_release`.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.signing import sign_release

Sessions = async_sessionmaker[AsyncSession]

OLD_RELEASE = "2026.1.0"
MODELS = ("m1", "m2")
REGIONS = ("eu-west", "us-east", "ap-south")
RINGS = ("internal", "beta", "ga")
COMPONENTS = [{"name": "adas", "version": "4.2.0"}, {"name": "infotainment", "version": "9.1"}]
# Stale vehicles are last seen (and registered) in 1999: tests of the offline marking use
# cutoffs around 2000, so no other test's vehicle (seen or registered now) is stale for them.
LONG_AGO = datetime(1999, 6, 1, tzinfo=UTC)
CUTOFF = datetime(2000, 1, 1, tzinfo=UTC)


def unique_prefix(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}-"


# --- Through a session factory -------------------------------------------------------------


# One statement writes every test vehicle, whichever factory builds the rows (psycopg's
# placeholders: run by the driver under a session and on a plain connection alike).
_INSERT_VEHICLES = """
    INSERT INTO vehicles (id, model, region, ring, org, status, desired_release_version,
                          actual_release_version, last_seen_at, created_at, updated_at,
                          reason_codes, battery_percent, stationary)
    SELECT r.id, r.model, r.region, r.ring, coalesce(r.org, 'default'),
           coalesce(r.status, 'in_sync'), r.desired, r.actual,
           CASE WHEN r.seen_now THEN now() ELSE r.last_seen_at END,
           coalesce(r.created_at, now()), coalesce(r.created_at, now()),
           coalesce(r.reason_codes, '{}'), r.battery_percent, r.stationary
    FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb))
         AS r(id text, model text, region text, ring text, org text, status text, desired text,
              actual text, last_seen_at timestamptz, created_at timestamptz, reason_codes text[],
              seen_now boolean, battery_percent smallint, stationary boolean)
"""

# The last heartbeat of a fleet vehicle unless a test says otherwise: seen now (by the
# database's clock), charged and parked, so the default safety checks (30 %, stationary)
# let a rollout notify it.
PASSING_HEARTBEAT: dict[str, Any] = {"seen_now": True, "battery_percent": 80, "stationary": True}


def _vehicle_rows(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {"rows": json.dumps(rows, default=lambda t: t.isoformat())}


async def make_fleet(sessions: Sessions, *, prefix: str, count: int) -> None:
    """`count` vehicles `{prefix}0000000`... spread over models, regions and rings, in sync on an
    older release, with a fresh passing heartbeat (`PASSING_HEARTBEAT`); their model/region
    names carry the prefix so tests can target them alone."""
    rows = [
        {
            "id": f"{prefix}{i:07d}",
            "model": prefix + MODELS[i % 2],
            "region": prefix + REGIONS[i % 3],
            "ring": RINGS[i % 3],
            "desired": OLD_RELEASE,
            "actual": OLD_RELEASE,
            **PASSING_HEARTBEAT,
        }
        for i in range(count)
    ]
    async with sessions() as session:
        conn = await session.connection()
        await conn.exec_driver_sql(_INSERT_VEHICLES, _vehicle_rows(rows))
        await session.commit()


async def add_vehicles(
    conn: AsyncConnection,
    *,
    prefix: str,
    tag: str,
    count: int,
    last_seen_at: datetime | None,
    created_at: datetime | None = None,
    status: str = "in_sync",
    desired: str | None = OLD_RELEASE,
    actual: str | None = OLD_RELEASE,
    region: str = "r1",
    model: str = "m1",
    org: str = "default",
    reason_codes: list[str] | None = None,
) -> list[str]:
    """`count` vehicles `{prefix}{tag}0000`... of one place and status, last seen when the
    test says (the reconcile's offline marking and drift); returns their ids."""
    ids = [f"{prefix}{tag}{i:04d}" for i in range(count)]
    place = {"model": prefix + model, "region": prefix + region, "ring": "ga", "org": org}
    rows = [
        {
            "id": vehicle_id,
            **place,
            "status": status,
            "desired": desired,
            "actual": actual,
            "last_seen_at": last_seen_at,
            "created_at": created_at or datetime.now(UTC),
            "reason_codes": reason_codes or [],
        }
        for vehicle_id in ids
    ]
    await conn.exec_driver_sql(_INSERT_VEHICLES, _vehicle_rows(rows))
    return ids


async def statuses(conn: AsyncConnection, prefix: str) -> dict[str, str]:
    """Each vehicle's status, by id, under the prefix."""
    rows = await conn.execute(
        text("SELECT id, status FROM vehicles WHERE id LIKE :p ORDER BY id"), {"p": prefix + "%"}
    )
    return {r.id: r.status for r in rows}


# One statement writes every test release. Unsigned by default: its signature ("sig" in
# base64, key "k") verifies against no key.
_INSERT_RELEASE = """
    INSERT INTO releases (version, components, artifact_digest, signature, signing_key_id,
                          created_by)
    VALUES (%(version)s, CAST(%(components)s AS jsonb), %(digest)s, %(signature)s, %(key_id)s,
            'tests')
    ON CONFLICT DO NOTHING
"""


def _release_row(
    version: str,
    *,
    components: list[dict[str, str]] | None = None,
    digest: str = "sha256:00",
    signature: str = "c2ln",
    key_id: str = "k",
) -> dict[str, str]:
    return {
        "version": version,
        "components": json.dumps(components or []),
        "digest": digest,
        "signature": signature,
        "key_id": key_id,
    }


async def make_release(sessions: Sessions, *, version: str) -> None:
    """An unsigned release (the workflow path never verifies signatures)."""
    async with sessions() as session:
        conn = await session.connection()
        await conn.exec_driver_sql(_INSERT_RELEASE, _release_row(version))
        await session.commit()


# A canary gate that needs no samples: for rollouts whose vehicles nobody reports for.
LENIENT_GATES = {"canaryHealthy": {"minSuccessRate": 0, "minSamples": 0}}


def strategy(
    *, canary_size: int | None = 5, canary_bake: int = 3600, waves: Any = None
) -> dict[str, Any]:
    return {
        "canary": {"size": canary_size, "percent": None, "bakeSeconds": canary_bake},
        "waves": waves
        or [{"percent": 50, "bakeSeconds": 3600}, {"percent": 100, "bakeSeconds": 3600}],
    }


async def make_rollout(
    sessions: Sessions,
    *,
    release_version: str,
    targets: dict[str, Any],
    strategy: dict[str, Any],
    gates: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> int:
    """A pending rollout row, as the API inserts it (its workflow not started)."""
    async with sessions() as session:
        conn = await session.connection()
        rollout_id = (
            await conn.execute(
                text(
                    """
                    INSERT INTO rollouts (release_version, targets, strategy, gates, timeouts,
                                          retry, status, created_by, correlation_id)
                    VALUES (:release, CAST(:targets AS jsonb), CAST(:strategy AS jsonb),
                            CAST(:gates AS jsonb), CAST(:timeouts AS jsonb),
                            CAST(:retry AS jsonb), 'pending', 'tests', 'corr-test')
                    RETURNING id
                    """
                ),
                {
                    "release": release_version,
                    "targets": json.dumps(targets),
                    "strategy": json.dumps(strategy),
                    "gates": json.dumps(gates or {}),
                    "timeouts": json.dumps(timeouts or {}),
                    "retry": json.dumps(retry or {}),
                },
            )
        ).scalar_one()
        await conn.execute(
            text("UPDATE rollouts SET workflow_id = 'rollout-' || id WHERE id = :id"),
            {"id": rollout_id},
        )
        await session.commit()
        return int(rollout_id)


async def fleet_rollout(
    sessions: Sessions,
    *,
    name: str,
    vehicles: int,
    release: str,
    strategy: dict[str, Any],
    models: tuple[str, ...] = ("m1",),
    regions: tuple[str, ...] = (),
    **rollout: Any,
) -> tuple[int, str]:
    """A fleet of `vehicles` (`make_fleet`) under a new prefix from `name`, `release`
    registered, and a pending rollout of it over the fleet's vehicles of `models` and
    `regions` (names without the prefix); `rollout` goes to `make_rollout`. Returns the
    rollout's id and the prefix."""
    prefix = unique_prefix(name)
    await make_fleet(sessions, prefix=prefix, count=vehicles)
    await make_release(sessions, version=release)
    targets = {
        key: [prefix + name for name in names]
        for key, names in (("models", models), ("regions", regions))
        if names
    }
    rollout_id = await make_rollout(
        sessions, release_version=release, targets=targets, strategy=strategy, **rollout
    )
    return rollout_id, prefix


async def fetch_all(sessions: Sessions, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with sessions() as session:
        conn = await session.connection()
        rows = await conn.execute(text(sql), params)
        return [dict(row._mapping) for row in rows]


async def fetch_one(sessions: Sessions, sql: str, **params: Any) -> dict[str, Any]:
    rows = await fetch_all(sessions, sql, **params)
    assert len(rows) == 1, rows
    return rows[0]


async def stage_vehicles(sessions: Sessions, rollout_id: int, stage: int) -> list[str]:
    """The ids of the vehicles the rollout planned for that stage, in id order."""
    rows = await fetch_all(
        sessions,
        "SELECT vehicle_id FROM rollout_targets WHERE rollout_id = :r AND stage = :s"
        " ORDER BY vehicle_id",
        r=rollout_id,
        s=stage,
    )
    return [r["vehicle_id"] for r in rows]


# --- Through a database URL (the API tests) ------------------------------------------------


def insert_vehicles(
    database_url: str,
    ids: list[str],
    *,
    model: str = "atlas",
    region: str = "eu-west",
    ring: str = "broad",
    release: str | None = None,
    battery_percent: int | None = PASSING_HEARTBEAT["battery_percent"],
) -> None:
    """Vehicles `ids` of one place, in sync on `release`, with a fresh passing heartbeat
    (`PASSING_HEARTBEAT`; `battery_percent=None`: its battery unknown)."""
    rows = [
        {
            "id": vehicle_id,
            "model": model,
            "region": region,
            "ring": ring,
            "desired": release,
            "actual": release,
            **PASSING_HEARTBEAT,
            "battery_percent": battery_percent,
        }
        for vehicle_id in ids
    ]
    with psycopg.connect(database_url) as conn:
        conn.execute(_INSERT_VEHICLES, _vehicle_rows(rows))


def insert_signed_release(
    database_url: str,
    key: Ed25519PrivateKey,
    version: str,
    *,
    digest: str = "sha256:" + "ab" * 32,
    signed_digest: str | None = None,
) -> None:
    """A release signed by `key`; `signed_digest` (a different digest) makes it tampered."""
    signature, kid = sign_release(key, version, signed_digest or digest, COMPONENTS)
    row = _release_row(
        version, components=COMPONENTS, digest=digest, signature=signature, key_id=kid
    )
    with psycopg.connect(database_url) as conn:
        conn.execute(_INSERT_RELEASE, row)


def insert_release(database_url: str, version: str) -> None:
    """An unsigned release (see `_INSERT_RELEASE`)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(_INSERT_RELEASE, _release_row(version))


def desired_states_issued(database_url: str, release: str, ids: list[str]) -> tuple[int, int]:
    """(desired states for vehicles `ids`, audit entries `desired_states.created` of
    `release`): what a POST /desired-states did."""
    with psycopg.connect(database_url) as conn:
        states = conn.execute(
            "SELECT count(*) FROM desired_states WHERE vehicle_id = ANY(%s)", (ids,)
        ).fetchone()
        audited = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'desired_states.created'"
            " AND target_id = %s",
            (release,),
        ).fetchone()
    assert states is not None and audited is not None
    return int(states[0]), int(audited[0])


def assert_stored_exactly_once(
    database_url: str, prefix: str, acked: list[tuple[str, str]]
) -> None:
    """Every acknowledged event (vehicle id, event id) is stored once, and nothing else of the
    test's vehicles (ids starting with `prefix`) is."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT (te.vehicle_id, te.event_id))"
            " FROM unnest(%s::text[], %s::uuid[]) AS acked(vehicle_id, event_id)"
            " JOIN timeline_events te"
            "   ON te.vehicle_id = acked.vehicle_id AND te.event_id = acked.event_id",
            ([vehicle_id for vehicle_id, _ in acked], [event_id for _, event_id in acked]),
        ).fetchone()
        total = conn.execute(
            "SELECT count(*) FROM timeline_events WHERE vehicle_id LIKE %s", (prefix + "%",)
        ).fetchone()
    assert len(set(acked)) == len(acked)  # no event acknowledged twice
    assert rows == (len(acked), len(acked))  # every acknowledged event, exactly once
    assert total == (len(acked),)  # and nothing else
