"""services.reconcile against real PostgreSQL: offline marking, drift, reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from models.scope import UNRESTRICTED, Scope
from services import reconcile as svc
from tests.factories import CUTOFF, LONG_AGO, add_vehicles, statuses, unique_prefix


async def test_mark_offline_marks_exactly_the_stale_ones_and_is_idempotent(
    session: AsyncSession,
) -> None:
    prefix = unique_prefix("off")
    conn = await session.connection()
    stale = await add_vehicles(conn, prefix=prefix, tag="S", count=25, last_seen_at=LONG_AGO)
    fresh = await add_vehicles(conn, prefix=prefix, tag="F", count=5, last_seen_at=CUTOFF)
    # Never seen: offline only when registered before the cutoff.
    unseen_old = await add_vehicles(
        conn, prefix=prefix, tag="U", count=3, last_seen_at=None, created_at=LONG_AGO
    )
    unseen_new = await add_vehicles(conn, prefix=prefix, tag="N", count=2, last_seen_at=None)
    already = await add_vehicles(
        conn, prefix=prefix, tag="A", count=4, last_seen_at=LONG_AGO, status="offline"
    )

    # Small batches: the keyset cursor walks several of them.
    marked = await svc.mark_offline(session, cutoff=CUTOFF, batch_size=7)
    assert marked == len(stale) + len(unseen_old)
    got = await statuses(conn, prefix)
    assert {v for v, s in got.items() if s == "offline"} == set(stale + unseen_old + already)
    assert all(got[v] == "in_sync" for v in fresh + unseen_new)
    changed = await conn.execute(
        text("SELECT count(*) FROM vehicles WHERE id = ANY(:ids) AND updated_at > :t"),
        {"ids": stale, "t": LONG_AGO},
    )
    assert changed.scalar_one() == len(stale)

    assert await svc.mark_offline(session, cutoff=CUTOFF, batch_size=7) == 0


async def test_mark_offline_batch_reports_its_cursor(session: AsyncSession) -> None:
    """Batch by batch from the cursor each batch reports, to the end (the shared database may
    hold other tests' candidates: a full batch is followed); then nothing is left after it."""
    prefix = unique_prefix("cur")
    conn = await session.connection()
    stale = await add_vehicles(conn, prefix=prefix, tag="S", count=5, last_seen_at=LONG_AGO)
    after_key, after_id, marked = None, None, 0
    while True:
        batch = await svc.mark_offline_batch(
            session, cutoff=CUTOFF, after_key=after_key, after_id=after_id, batch_size=10_000
        )
        marked += batch.marked
        assert batch.last_id is not None
        if batch.scanned < 10_000:
            break
        after_key, after_id = batch.last_key, batch.last_id
    assert marked >= 5
    assert await statuses(conn, prefix) == dict.fromkeys(stale, "offline")
    after = await svc.mark_offline_batch(
        session,
        cutoff=CUTOFF,
        after_key=batch.last_key,
        after_id=batch.last_id,
        batch_size=10_000,
    )
    assert after.scanned == 0 and after.marked == 0


async def _my_drift(session: AsyncSession, run_id: int, prefix: str) -> list[tuple]:
    conn = await session.connection()
    rows = await conn.execute(
        text(
            "SELECT desired_release_version, actual_release_version, status, region, model,"
            " org, vehicles FROM reconcile_drift WHERE run_id = :id AND region LIKE :p"
            " ORDER BY 1, 2, 3, 4, 5, 6"
        ),
        {"id": run_id, "p": prefix + "%"},
    )
    return [tuple(r) for r in rows]


# (tag, count, how the group differs from add_vehicles' in-sync vehicle of r1, m1, default)
DRIFT_FLEET: list[tuple[str, int, dict[str, Any]]] = [
    ("I", 6, {}),  # in sync
    ("P", 4, {"desired": "2026.2.0", "status": "pending"}),
    ("Q", 2, {"desired": "2026.2.0", "status": "failed", "region": "r2"}),
    ("X", 3, {"desired": "2026.2.0", "actual": None, "status": "updating", "org": "acme"}),
    ("Z", 2, {"desired": None}),  # no desired release: nothing to drift from
]


async def test_record_drift_counts_and_is_idempotent_per_run_key(session: AsyncSession) -> None:
    prefix = unique_prefix("drift")
    conn = await session.connection()
    seen = datetime.now(UTC)
    for tag, count, differs in DRIFT_FLEET:
        await add_vehicles(conn, prefix=prefix, tag=tag, count=count, last_seen_at=seen, **differs)

    run_key = f"test-{prefix}"
    run = await svc.record_drift(session, run_key=run_key, marked_offline=3, cutoff=CUTOFF)
    assert run.created
    assert await _my_drift(session, run.run_id, prefix) == [
        ("2026.2.0", "", "updating", prefix + "r1", prefix + "m1", "acme", 3),
        ("2026.2.0", "2026.1.0", "failed", prefix + "r2", prefix + "m1", "default", 2),
        ("2026.2.0", "2026.1.0", "pending", prefix + "r1", prefix + "m1", "default", 4),
    ]
    row = (
        await conn.execute(
            text(
                "SELECT drifted, marked_offline, finished_at, summary FROM reconcile_runs"
                " WHERE id = :id"
            ),
            {"id": run.run_id},
        )
    ).one()
    assert row.drifted == run.drifted >= 9 and row.marked_offline == 3
    assert row.finished_at is not None and row.summary["markedOffline"] == 3
    audit = (
        await conn.execute(
            text(
                "SELECT actor, source, target_type, payload FROM audit_log"
                " WHERE action = 'fleet.reconciled' AND correlation_id = :k"
            ),
            {"k": run_key},
        )
    ).all()
    assert len(audit) == 1 and audit[0].actor == "reconcile" and audit[0].source == "system"
    assert audit[0].target_type == "fleet" and audit[0].payload["runId"] == run.run_id
    feed = await conn.execute(
        text(
            "SELECT count(*) FROM change_feed WHERE event = 'fleet.summary'"
            " AND (payload ->> 'runId')::bigint = :id"
        ),
        {"id": run.run_id},
    )
    assert feed.scalar_one() == 1

    # The same key again (a retried activity): the same run, nothing added.
    await add_vehicles(conn, prefix=prefix, tag="L", count=5, last_seen_at=seen, desired="2026.3.0")
    again = await svc.record_drift(session, run_key=run_key, marked_offline=3)
    assert not again.created and again.run_id == run.run_id and again.drifted == run.drifted
    assert len(await _my_drift(session, run.run_id, prefix)) == 3
    audits = await conn.execute(
        text("SELECT count(*) FROM audit_log WHERE correlation_id = :k"), {"k": run_key}
    )
    assert audits.scalar_one() == 1

    # A new key is a new run and sees the change.
    other = await svc.record_drift(session, run_key=run_key + "-2")
    assert other.created and other.run_id != run.run_id
    assert len(await _my_drift(session, other.run_id, prefix)) == 4


async def test_latest_report_and_health_respect_the_scope(session: AsyncSession) -> None:
    prefix = unique_prefix("rep")
    conn = await session.connection()
    seen = datetime.now(UTC)
    await add_vehicles(
        conn,
        prefix=prefix,
        tag="A",
        count=3,
        last_seen_at=seen,
        desired="2026.2.0",
        status="failed",
        reason_codes=["APPLY_FAILED"],
    )
    await add_vehicles(
        conn,
        prefix=prefix,
        tag="B",
        count=2,
        last_seen_at=seen,
        desired="2026.2.0",
        status="blocked",
        region="r2",
        reason_codes=["BATTERY_LOW", "NOT_STATIONARY"],
    )
    await add_vehicles(
        conn,
        prefix=prefix,
        tag="C",
        count=1,
        last_seen_at=seen - timedelta(days=1),
        status="offline",
        reason_codes=["BATTERY_LOW"],
    )
    run = await svc.record_drift(session, run_key=f"test-{prefix}", marked_offline=7)

    mine = Scope(regions=(prefix + "r1",))
    report = await svc.latest_report(session, scope=mine)
    assert report.latest is not None and report.latest.id == run.run_id
    assert report.latest.drifted == 3 and report.latest.marked_offline is None
    assert [(d.status, d.region, d.vehicles) for d in report.drift] == [
        ("failed", prefix + "r1", 3)
    ]
    assert report.recent_runs[0].id == run.run_id

    everything = await svc.latest_report(session, scope=UNRESTRICTED)
    assert everything.latest is not None and everything.latest.marked_offline == 7
    assert everything.latest.drifted == run.drifted >= 5

    health = await svc.fleet_health(session, scope=Scope(models=(prefix + "m1",)))
    assert health.total == 6 and health.offline == 1
    assert health.by_status["failed"] == 3 and health.by_status["blocked"] == 2
    assert health.by_status["in_sync"] == 0
    assert [(c.reason_code, c.vehicles) for c in health.top_reason_codes] == [
        ("APPLY_FAILED", 3),  # ties by code
        ("BATTERY_LOW", 3),
        ("NOT_STATIONARY", 2),
    ]
    r1 = await svc.fleet_health(session, scope=Scope(regions=(prefix + "r2",)))
    assert r1.total == 2 and r1.by_status["blocked"] == 2


async def test_a_run_that_changed_nothing_writes_no_audit_entry(session: AsyncSession) -> None:
    """The reconcile's audit entry says what a run changed: a run with nothing marked
    offline, nothing re-checked, no rollout started and the same drift as the run before it
    writes none (it still records its run); one that started a pending rollout writes one."""
    conn = await session.connection()
    prefix = unique_prefix("quiet")
    first = await svc.record_drift(session, run_key=f"{prefix}-1")
    quiet = await svc.record_drift(session, run_key=f"{prefix}-2")
    assert quiet.created and quiet.drifted == first.drifted
    started = await svc.record_drift(session, run_key=f"{prefix}-3", started_rollouts=1)

    async def entries(run_key: str) -> list[Any]:
        rows = await conn.execute(
            text(
                "SELECT payload FROM audit_log WHERE action = 'fleet.reconciled'"
                " AND correlation_id = :k"
            ),
            {"k": run_key},
        )
        return [r.payload for r in rows]

    assert await entries(f"{prefix}-2") == []
    [entry] = await entries(f"{prefix}-3")
    assert entry["runId"] == started.run_id and entry["startedRollouts"] == 1
    # Drift that moved is a change too.
    await add_vehicles(conn, prefix=prefix, tag="D", count=2, last_seen_at=CUTOFF, desired="9.9")
    await svc.record_drift(session, run_key=f"{prefix}-4")
    assert len(await entries(f"{prefix}-4")) == 1
