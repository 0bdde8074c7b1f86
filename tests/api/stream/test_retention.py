"""Retention and the stream: a client resuming from an id the retention purge deleted gets one
`resync` (EVENTS_EXPIRED), then the live events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from temporalio.testing import ActivityEnvironment

from activities.retention import RetentionActivities
from core.settings import Settings
from models.workflows import PurgeInput
from tests.api.conftest import bearer, serve_app
from tests.api.stream import aged_feed_rows, open_stream
from tests.factories import Sessions


async def test_a_resume_from_a_purged_id_gets_resync_then_live_events(
    settings: Settings,
    token: Callable[..., str],
    own_database: str,
    own_sessions: Sessions,
) -> None:
    ids = aged_feed_rows(own_database, [timedelta(days=2), timedelta(days=2), timedelta(0)])
    purge = RetentionActivities(own_sessions).purge_change_feed
    cutoff = datetime.now(UTC) - timedelta(hours=24)
    assert (await ActivityEnvironment().run(purge, PurgeInput(cutoff=cutoff))).deleted == 2
    own = settings.model_copy(update={"database_url": own_database})
    async with serve_app(own) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
        viewer = bearer(token("viewer"))
        async with open_stream(c, viewer, lastEventId=str(ids[0])) as sse:
            got = await sse.event()
            assert got == {"event": "resync", "data": {"reason": "EVENTS_EXPIRED"}}
            live = aged_feed_rows(own_database, [timedelta(0)])[0]
            got = await sse.event()
            assert got is not None and (got["event"], got["id"]) == ("vehicle.updated", str(live))
        # From the last purged id, nothing kept is missing: served event by event.
        async with open_stream(c, viewer, lastEventId=str(ids[1])) as sse:
            got = await sse.event()
            assert got is not None and got["id"] == str(ids[2])
