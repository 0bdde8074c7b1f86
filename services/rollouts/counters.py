"""A rollout's progress counters (`rollouts.targeted`, `notified`, `updating`, ...), moved by
the writes that move its targets, never counted by a scan: `targeted` when the targets are
planned (plan.py), `notified` and `pending` when a batch is issued or skipped (issue.py,
rollback.py), and the current-state counters here.

`move_targets` ends such a statement: given its CTE `todo` (the targets to move, with their
`old_state`), it updates them and moves the rollout's current-state counters (updating,
succeeded, failed, blocked) by the difference, answering how many targets moved
(`COUNTER_DELTAS`); for a keyset sweep over `todo` (ordered by vehicle id, `LIMIT :n`) it also
answers how many the batch selected and the last vehicle id, where the next batch starts
(`SWEEP_DELTAS`, run by `run_sweep_batch`). `rollouts.rechecked` moves the same way: the
targets notified again by the blocked re-check and not yet done (`notified` or `updating`),
which the settle does not wait for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause
from sqlmodel.ext.asyncio.session import AsyncSession

COUNTS_COLUMNS = "targeted, notified, updating, succeeded, failed, blocked, pending"


# How the counters of the current states move: per state, the targets that entered it
# minus those that left it. `rechecked` (targets `notified` or `updating` with
# rollout_targets.rechecked): the flag's new value stands for its old one too, because it
# changes only as a target comes from another state (the re-check: blocked -> notified; the
# retry: failed -> notified); no statement that moves a notified or updating target changes it.
_DELTAS = """
    deltas AS (
        SELECT count(*) AS moved,
               count(*) FILTER (WHERE new_state = 'updating')
                 - count(*) FILTER (WHERE old_state = 'updating') AS updating,
               count(*) FILTER (WHERE new_state = 'succeeded')
                 - count(*) FILTER (WHERE old_state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE new_state = 'failed')
                 - count(*) FILTER (WHERE old_state = 'failed') AS failed,
               count(*) FILTER (WHERE new_state = 'blocked')
                 - count(*) FILTER (WHERE old_state = 'blocked') AS blocked,
               count(*) FILTER (WHERE new_state IN ('notified', 'updating') AND rechecked)
                 - count(*) FILTER (WHERE old_state IN ('notified', 'updating') AND rechecked)
                 AS rechecked
        FROM moved
    ),
    counted AS (
        UPDATE rollouts r
        SET updating = greatest(r.updating + deltas.updating, 0),
            succeeded = greatest(r.succeeded + deltas.succeeded, 0),
            failed = greatest(r.failed + deltas.failed, 0),
            blocked = greatest(r.blocked + deltas.blocked, 0),
            rechecked = greatest(r.rechecked + deltas.rechecked, 0),
            updated_at = now()
        FROM deltas WHERE r.id = :rid AND deltas.moved > 0
        RETURNING 1
    )
"""


COUNTER_DELTAS = _DELTAS + "    SELECT moved FROM deltas\n"


SWEEP_DELTAS = (
    _DELTAS
    + """    SELECT (SELECT moved FROM deltas) AS changed,
           (SELECT count(*) FROM todo) AS selected,
           (SELECT max(vehicle_id) FROM todo) AS last_vehicle_id
"""
)


@dataclass(frozen=True)
class SweepBatch:
    """One keyset batch of a sweep over a rollout's targets: how many targets it changed,
    whether it reached the end, and the vehicle id where the next batch starts."""

    changed: int
    done: bool
    last_vehicle_id: str


async def run_sweep_batch(
    session: AsyncSession,
    statement: TextClause,
    params: dict[str, Any],
    *,
    batch_size: int,
    after_vehicle_id: str,
) -> SweepBatch:
    """Run one keyset batch of a statement ending in `SWEEP_DELTAS` (its batch bounds bound
    as `:n` and `:after`) and answer its `SweepBatch`."""
    conn = await session.connection()
    row = (
        await conn.execute(statement, {**params, "n": batch_size, "after": after_vehicle_id})
    ).one()
    return SweepBatch(
        changed=int(row.changed),
        done=int(row.selected) < batch_size,
        last_vehicle_id=row.last_vehicle_id or after_vehicle_id,
    )


def move_targets(assignments: str, *, sweep: bool) -> str:
    """The end of a statement whose CTE `todo` holds the targets to move (`vehicle_id`,
    `old_state`): the CTE `moved`, which sets `assignments` (SQL) on each of them, then the
    counters' tail (`SWEEP_DELTAS` for a keyset sweep, else `COUNTER_DELTAS`)."""
    moved = f"""
    moved AS (
        UPDATE rollout_targets t
        SET {assignments}
        FROM todo WHERE t.rollout_id = :rid AND t.vehicle_id = todo.vehicle_id
        RETURNING todo.old_state, t.state AS new_state, t.rechecked
    ),"""
    return moved + (SWEEP_DELTAS if sweep else COUNTER_DELTAS)
