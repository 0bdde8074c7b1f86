"""`write_group`: one group of telemetry requests in one transaction, its steps in order."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from services.telemetry.derive import derive_statuses, write_derived_rows
from services.telemetry.events import insert_events
from services.telemetry.group import (
    Group,
    GroupRequest,
    GroupResult,
    Redo,
    SeqJumped,
    WideWritePolicy,
    merge,
)
from services.telemetry.heartbeats import refresh_wide_rows, upsert_narrow_rows
from services.telemetry.lock import lock_wide_rows, refuse_jumps
from services.telemetry.outcomes import pick_outcomes, record_outcomes
from services.telemetry.refuse import refuse_requests
from services.telemetry.staging import stage, staging_connection


async def write_group(
    session: AsyncSession,
    *,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime | None = None,
) -> GroupResult:
    """Write one group (the caller commits). Fills each request's accepted/duplicates/refused.

    Bulk data goes in by binary COPY into session-local staging tables (emptied at commit),
    then moves with set-based statements: no row-by-row statement, no per-value text
    escaping in Python. Groups of unrestricted callers naming only known vehicles (the
    common case) are written optimistically, without a separate existence check: the narrow
    upsert joins `vehicles` and counts what it matched; a shortfall rolls the transaction
    back and writes the group again after refusing the requests that name unknown
    vehicles. A request holding an event whose `seq` jumps too far is marked invalid
    (`GroupRequest.invalid`) and the group written again without it, the same way."""
    now = now or datetime.now(UTC)
    for req in requests:
        req.invalid = None
    checked = any(not r.scope.unrestricted for r in requests)
    while True:  # each SeqJumped marks at least one more request invalid
        try:
            return await _write_group(session, requests, policy, now, checked=checked)
        except SeqJumped as jumped:
            await session.rollback()
            if not refuse_jumps(requests, jumped.stored, policy.max_seq_jump, now):
                raise RuntimeError("a seq jumped too far, but no request holds it") from None
        except Redo:
            if checked:
                raise
            await session.rollback()
            checked = True


async def _write_group(
    session: AsyncSession,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime,
    *,
    checked: bool,
) -> GroupResult:
    """The steps, each timed (`Group.lap`), in the lock order: telemetry rows, then vehicles,
    then rollout targets, each by vehicle id."""
    group = await _open(session, requests, policy, now, checked=checked)
    if not group.heartbeats and not group.latest:
        return group.result
    await stage(group)
    group.lap("stage")
    await upsert_narrow_rows(group)
    group.lap("telemetry")
    await lock_wide_rows(group)
    group.lap("select")
    await insert_events(group)
    group.lap("events")
    await refresh_wide_rows(group)
    group.lap("refresh")
    derive_statuses(group)
    group.lap("derive")
    await write_derived_rows(group)
    group.lap("wide")
    pick_outcomes(group)
    await record_outcomes(group)
    group.lap("outcomes")
    return group.result


async def _open(
    session: AsyncSession,
    requests: list[GroupRequest],
    policy: WideWritePolicy,
    now: datetime,
    *,
    checked: bool,
) -> Group:
    """The group, from nothing (a retried group starts again): its staging connection, its
    refused requests when checked, the live ones merged."""
    clock = time.perf_counter()
    cpu = time.process_time()
    result = GroupResult()
    for req in requests:
        req.accepted = req.duplicates = 0
        req.refused = None
    driver = await staging_connection(session)
    live = [r for r in requests if r.invalid is None]
    if checked and await refuse_requests(driver, live):
        live = [r for r in live if r.refused is None]
    result.refused_requests = len(requests) - len(live)
    group = Group(
        session=session,
        driver=driver,
        policy=policy,
        now=now,
        live=live,
        result=result,
        clock=clock,
        cpu=cpu,
    )
    merge(group)
    return group
