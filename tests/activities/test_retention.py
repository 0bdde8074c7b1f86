"""The retention workflow's activities (`RetentionActivities`) against real PostgreSQL, each
in a database of its own (they delete by age, whatever test wrote the rows): only what is
past retention goes, in batches (the stream's side: tests/api/stream/test_retention.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from temporalio.testing import ActivityEnvironment

from activities.retention import RetentionActivities
from models.workflows import PurgeInput, PurgeProgress
from tests.api.stream import aged_feed_rows
from tests.factories import Sessions

NOW = datetime.now(UTC)


def _ids(url: str, sql: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(sql)]


async def test_the_change_feed_purge_deletes_only_past_retention_in_batches(
    own_database: str, own_sessions: Sessions
) -> None:
    old = [timedelta(hours=30 + n) for n in range(7, 0, -1)]
    ids = aged_feed_rows(own_database, [*old, timedelta(hours=1), timedelta(hours=30)])
    heartbeats: list[PurgeProgress] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    purge = RetentionActivities(own_sessions).purge_change_feed
    result = await env.run(purge, PurgeInput(cutoff=NOW - timedelta(hours=24), batch_size=3))
    # The 7 old rows, 3 at a time (3 + 3 + 1); from the first newer row on, all are kept,
    # even the one behind it that is old (the purge deletes from the bottom, contiguously).
    assert (result.deleted, result.batches, result.done) == (7, 3, True)
    assert [h.deleted for h in heartbeats] == [3, 6, 7]
    assert _ids(own_database, "SELECT id FROM change_feed ORDER BY id") == ids[7:]
    again = await env.run(purge, PurgeInput(cutoff=NOW - timedelta(hours=24), batch_size=3))
    assert again.deleted == 0  # idempotent


async def test_the_change_feed_purge_keeps_the_newest_row(
    own_database: str, own_sessions: Sessions
) -> None:
    ids = aged_feed_rows(own_database, [timedelta(days=3), timedelta(days=2)])
    purge = RetentionActivities(own_sessions).purge_change_feed
    result = await ActivityEnvironment().run(purge, PurgeInput(cutoff=NOW, batch_size=10))
    assert result.deleted == 1
    assert _ids(own_database, "SELECT id FROM change_feed") == ids[1:]


async def test_the_change_feed_purge_stops_after_max_batches(
    own_database: str, own_sessions: Sessions
) -> None:
    aged_feed_rows(own_database, [timedelta(days=2)] * 6 + [timedelta(0)])
    purge = RetentionActivities(own_sessions).purge_change_feed
    cutoff = NOW - timedelta(days=1)
    first = await ActivityEnvironment().run(
        purge, PurgeInput(cutoff=cutoff, batch_size=2, max_batches=2)
    )
    assert (first.deleted, first.done) == (4, False)  # the next run goes on
    second = await ActivityEnvironment().run(purge, PurgeInput(cutoff=cutoff, batch_size=2))
    assert (second.deleted, second.done) == (2, True)


def _timeline(url: str, rows: list[tuple[str, timedelta]]) -> None:
    with psycopg.connect(url) as conn:
        for n, (vehicle, age) in enumerate(rows):
            conn.execute(
                "INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at,"
                " received_at) VALUES (%s, gen_random_uuid(), %s, 'heartbeat', now() - %s,"
                " now() - %s)",
                (vehicle, n, age, age),
            )


async def test_the_timeline_purge_goes_partition_by_partition_in_batches(
    own_database: str, own_sessions: Sessions
) -> None:
    vehicles = [f"car-{n}" for n in range(40)]  # spread over the 16 hash partitions
    _timeline(own_database, [(v, timedelta(days=100)) for v in vehicles for _ in range(3)])
    _timeline(own_database, [(v, timedelta(days=80)) for v in vehicles])
    heartbeats: list[PurgeProgress] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    purge = RetentionActivities(own_sessions).purge_timeline
    cutoff = NOW - timedelta(days=90)
    result = await env.run(purge, PurgeInput(cutoff=cutoff, batch_size=4))
    assert (result.deleted, result.done) == (120, True)
    assert result.batches > 16  # some partition took several batches
    assert heartbeats[-1].partition == 16 and heartbeats[-1].deleted == 120
    left = _ids(own_database, "SELECT count(*) FROM timeline_events WHERE received_at < now()")
    assert left == [40]
    assert _ids(
        own_database,
        "SELECT count(*) FROM timeline_events WHERE received_at < now() - interval '90 days'",
    ) == [0]


async def test_a_retried_timeline_purge_resumes_at_its_partition(
    own_database: str, own_sessions: Sessions
) -> None:
    _timeline(own_database, [(f"car-{n}", timedelta(days=100)) for n in range(40)])
    env = ActivityEnvironment()
    # A previous attempt heartbeated that it had finished partitions 0-14.
    env.info = env.info.__class__(
        **{**env.info.__dict__, "heartbeat_details": [{"partition": 15, "deleted": 0}]}
    )
    purge = RetentionActivities(own_sessions).purge_timeline
    result = await env.run(purge, PurgeInput(cutoff=NOW - timedelta(days=90), batch_size=100))
    counted = _ids(own_database, "SELECT count(*) FROM timeline_events_p15")[0]
    assert result.deleted == 40 - sum(
        _ids(own_database, f"SELECT count(*) FROM timeline_events_p{p:02d}")[0] for p in range(15)
    )
    assert counted == 0


async def test_the_audit_purge_deletes_past_retention_in_batches(
    own_database: str, own_sessions: Sessions
) -> None:
    with psycopg.connect(own_database) as conn:
        for days in (400, 390, 380, 10):
            conn.execute(
                "INSERT INTO audit_log (at, actor, source, action, target_type, result)"
                " VALUES (now() - make_interval(days => %s), 'a', 'system', %s, 't', 'ok')",
                (days, f"x.{days}"),
            )
    purge = RetentionActivities(own_sessions).purge_audit_log
    result = await ActivityEnvironment().run(
        purge, PurgeInput(cutoff=NOW - timedelta(days=365), batch_size=2)
    )
    assert (result.deleted, result.batches) == (3, 2)
    with psycopg.connect(own_database) as conn:
        assert [r[0] for r in conn.execute("SELECT action FROM audit_log")] == ["x.10"]
