"""Rows for the rollout tests, written with plain SQL: a fleet under a unique id prefix, a
release, a pending rollout (as the API inserts it)."""

from __future__ import annotations

import json
import secrets
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

MODELS = ("m1", "m2")
REGIONS = ("eu-west", "us-east", "ap-south")
RINGS = ("internal", "beta", "ga")
OLD_RELEASE = "2026.1.0"


def unique_prefix(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}-"


async def make_fleet(
    sessions: async_sessionmaker[AsyncSession], *, prefix: str, count: int
) -> None:
    """`count` vehicles `{prefix}0000000`... spread over models, regions and rings, in sync on an
    older release; their model/region names carry the prefix so tests can target them alone."""
    async with sessions() as session:
        conn = await session.connection()
        await conn.execute(
            text(
                """
                INSERT INTO vehicles (id, model, region, ring, desired_release_version,
                                      actual_release_version, status)
                SELECT CAST(:prefix AS text) || lpad(i::text, 7, '0'),
                       CAST(:prefix AS text) || (ARRAY['m1','m2'])[1 + i % 2],
                       CAST(:prefix AS text) || (ARRAY['eu-west','us-east','ap-south'])[1 + i % 3],
                       (ARRAY['internal','beta','ga'])[1 + i % 3],
                       :old, :old, 'in_sync'
                FROM generate_series(0, :count - 1) AS i
                """
            ),
            {"prefix": prefix, "count": count, "old": OLD_RELEASE},
        )
        await session.commit()


async def make_release(sessions: async_sessionmaker[AsyncSession], *, version: str) -> None:
    async with sessions() as session:
        conn = await session.connection()
        await conn.execute(
            text(
                "INSERT INTO releases (version, artifact_digest, signature, signing_key_id,"
                " created_by) VALUES (:v, 'sha256:00', 'sig', 'test-key', 'tests')"
                " ON CONFLICT DO NOTHING"
            ),
            {"v": version},
        )
        await session.commit()


def strategy(
    *, canary_size: int | None = 5, canary_bake: int = 3600, waves: Any = None
) -> dict[str, Any]:
    return {
        "canary": {"size": canary_size, "percent": None, "bakeSeconds": canary_bake},
        "waves": waves
        or [{"percent": 50, "bakeSeconds": 3600}, {"percent": 100, "bakeSeconds": 3600}],
    }


async def make_rollout(
    sessions: async_sessionmaker[AsyncSession],
    *,
    release_version: str,
    targets: dict[str, Any],
    strategy: dict[str, Any],
    gates: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> int:
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


async def fetch_all(
    sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any
) -> list[dict[str, Any]]:
    async with sessions() as session:
        conn = await session.connection()
        rows = await conn.execute(text(sql), params)
        return [dict(row._mapping) for row in rows]


async def fetch_one(
    sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any
) -> dict[str, Any]:
    rows = await fetch_all(sessions, sql, **params)
    assert len(rows) == 1, rows
    return rows[0]
