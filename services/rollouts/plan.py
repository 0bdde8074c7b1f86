"""Planning a rollout's targets when its workflow starts: the vehicles its targets select now,
split into stages (pure `workflows.policy`), one `rollout_targets` row each, once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import TargetsChanged
from models.workflows import StagePlan
from services.rollouts.queries import load_rollout
from services.targets import REQUEST_MATCH, match_params
from workflows.policy import plan_from_strategy, stage_ends


@dataclass(frozen=True)
class Expansion:
    release_version: str
    targeted: int
    stages: list[StagePlan]
    counts_per_stage: list[int]
    inserted: bool


async def count_matching_vehicles(session: AsyncSession, *, targets: dict[str, Any]) -> int:
    """How many vehicles a rollout's `targets` select now."""
    conn = await session.connection()
    result = await conn.execute(
        text(f"SELECT count(*) FROM vehicles v WHERE {REQUEST_MATCH}"), match_params(targets)
    )
    return int(result.scalar_one())


async def expand_targets(
    session: AsyncSession, *, rollout_id: int, ends: Sequence[int], targets: dict[str, Any]
) -> list[int]:
    """Insert one `rollout_targets` row per matching vehicle, in one statement.

    `rank` is the vehicle's deterministic position in the rollout (md5 of rollout and vehicle
    id, ties by id), `stage` the first stage whose cumulative end rank `ends[i]` exceeds it
    (`width_bucket`: how many ends are <= rank). Each target keeps the vehicle's desired state
    and release of now, what a rollback returns it to: no other rollout and no direct desired
    state can change them while this rollout is active (the overlap rule), so they are still
    the vehicle's when its stage is issued.
    Sets `targeted`, `pending`, `stage_count`
    on the rollout; returns the number of targets per stage.
    """
    conn = await session.connection()
    # The rank sort of a million ids stays in memory; inserted in vehicle id order, the rows
    # fill the primary key and the stage index front to back instead of at random. Both sorts
    # compare bytes (COLLATE "C": the hex digest and ids sort the same, much faster); the
    # target lists are bound parameters, so an empty one is folded away when planning.
    # A plain INSERT: the caller holds the rollout's row lock and expands only once.
    await conn.execute(text("SET LOCAL work_mem = '256MB'"))
    await conn.execute(
        text(
            f"""
            WITH matched AS (
                SELECT v.id, v.desired_state_id,
                       coalesce(v.desired_release_version, v.actual_release_version)
                           AS previous_release,
                       row_number() OVER (
                           ORDER BY md5(CAST(:rid AS text) || ':' || v.id) COLLATE "C",
                                    v.id COLLATE "C"
                       ) - 1 AS rank
                FROM vehicles v
                WHERE {REQUEST_MATCH}
            )
            INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state,
                                         previous_desired_state_id, previous_release_version)
            SELECT :rid, m.id, width_bucket(m.rank, CAST(:ends AS bigint[])), m.rank, 'planned',
                   m.desired_state_id, m.previous_release
            FROM matched m
            ORDER BY m.id COLLATE "C"
            """
        ),
        {"rid": rollout_id, "ends": list(ends), **match_params(targets)},
    )
    counts = [0] * len(ends)
    rows = await conn.execute(
        text(
            "SELECT stage, count(*) AS n FROM rollout_targets WHERE rollout_id = :rid"
            " GROUP BY stage"
        ),
        {"rid": rollout_id},
    )
    for stage, n in rows:
        if 0 <= stage < len(counts):
            counts[stage] = int(n)
    targeted = sum(counts)
    await conn.execute(
        text(
            "UPDATE rollouts SET targeted = :targeted, pending = :targeted - notified,"
            " stage_count = :stage_count, updated_at = now() WHERE id = :rid"
        ),
        {"rid": rollout_id, "targeted": targeted, "stage_count": len(ends)},
    )
    return counts


async def plan_and_expand(session: AsyncSession, *, rollout_id: int) -> Expansion:
    """Plan the rollout and expand its targets, once: a second call returns the same plan.

    Locks the rollout row; counts the matching vehicles, plans the stages (pure policy) and
    inserts the targets in the same transaction. If the fleet changed between the count and
    the insert, raises `TargetsChanged` (the caller rolls back and retries).
    """
    rollout = await load_rollout(session, rollout_id=rollout_id, for_update=True)
    if rollout.stage_count > 0:  # expanded by an earlier attempt
        stages = plan_from_strategy(rollout.targeted, rollout.strategy)
        return Expansion(
            release_version=rollout.release_version,
            targeted=rollout.targeted,
            stages=stages,
            counts_per_stage=[s.size for s in stages],
            inserted=False,
        )
    targeted = await count_matching_vehicles(session, targets=rollout.targets)
    stages = plan_from_strategy(targeted, rollout.strategy)
    counts = await expand_targets(
        session, rollout_id=rollout_id, ends=stage_ends(stages), targets=rollout.targets
    )
    # Fresh statistics for the rows just inserted: the issue batches' plans depend on them
    # (autovacuum's analyze may come much later, or never where it is off).
    await (await session.connection()).execute(text("ANALYZE rollout_targets"))
    if counts != [s.size for s in stages]:
        raise TargetsChanged(
            f"rollout {rollout_id}: planned {[s.size for s in stages]}, inserted {counts}"
        )
    return Expansion(
        release_version=rollout.release_version,
        targeted=targeted,
        stages=stages,
        counts_per_stage=counts,
        inserted=True,
    )
