"""The in-process group committer of telemetry: many concurrent requests, one transaction.

Each `POST /telemetry` request, once validated, is handed to `TelemetryIngestor.submit`,
which queues it and waits. Writer tasks (`writers`, default 1: docs/telemetry.md, Processes)
each take everything queued (up to `group_max_items` items), write it with
`services.telemetry.write_group` in one transaction, commit, and only then wake the waiting
requests with their own counts: the `202` is sent after the events are durable in
PostgreSQL. Before that, `on_outcomes` hears which rollouts' targets the group moved (the
API signals their workflows, coalesced: their gates react in seconds). While one group
commits, the next one fills, so the number of transactions per second stays flat as load
grows.

Backpressure: the queue is bounded by items (events + heartbeats, queued or being written).
A request that does not fit raises `IngestOverloaded` at once (503 `OVERLOADED` with
`Retry-After`); nothing is dropped silently and memory stays bounded.

Failures: a group that meets a deadlock or serialization failure is retried whole (its
transaction rolled back), whether psycopg raised it on the driver connection or SQLAlchemy
wrapped it. A group that fails for any other reason but a lost connection is written again
request by request, each in a transaction of its own, so only the guilty request fails: 422
for a value PostgreSQL refused (a data error, SQLSTATE class 22 or 23), 500 for anything
else. Validation (models/storable.py) refuses what PostgreSQL would refuse before a request
joins a group: this is the second line, for what it cannot know (a constraint, a trigger, a
bug). It costs nothing while groups succeed. A lost connection fails the whole group (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import database_unavailable, sqlstate_of
from core.errors import InvalidInput, MotorcadeError, NotFound, Overloaded
from models.defaults import (
    DEFAULT_INGEST_GROUP_MAX_ITEMS,
    DEFAULT_INGEST_GROUP_WAIT_MS,
    DEFAULT_INGEST_QUEUE_MAX_ITEMS,
    DEFAULT_INGEST_WRITERS,
    DEFAULT_MAX_CLOCK_SKEW_SECONDS,
)
from models.scope import Scope
from models.telemetry import TelemetryBatch
from services.telemetry import GroupRequest, GroupResult, WideWritePolicy, write_group
from services.telemetry.clock import future_fields

log = structlog.stdlib.get_logger("motorcade.ingest")

RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
DATA_ERROR_CLASSES = {"22", "23"}  # data exception, integrity constraint violation
GROUP_ATTEMPTS = 4  # a group meeting one of those is written again, up to this many times

QUEUED_ITEMS = Gauge(
    "motorcade_ingest_queued_items", "Telemetry items queued or being written (this process)."
)
INGESTED = Counter(
    "motorcade_ingest_items_total",
    "Telemetry items committed, by kind (events inserted, duplicates, heartbeats).",
    ["kind"],
)
OVERLOADED = Counter(
    "motorcade_ingest_overloaded_total", "Requests refused with 503 OVERLOADED (queue full)."
)
ISOLATED_GROUPS = Counter(
    "motorcade_ingest_isolated_groups_total",
    "Groups that failed (not on a lost connection or contention) and were written again"
    " request by request.",
)
FAILED_REQUESTS = Counter(
    "motorcade_ingest_failed_requests_total",
    "Requests that failed alone once their group was written request by request, by kind"
    " (data: a value PostgreSQL refused, 422; internal: 500).",
    ["kind"],
)
GROUP_SECONDS = Histogram(
    "motorcade_ingest_group_seconds",
    "Time to write and commit one group of telemetry requests.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class IngestOverloaded(Overloaded):
    """The ingest queue is full (or ingestion is stopping): retry after `retry_after`."""


class IngestRefused(NotFound):
    """The request names a vehicle that is unknown or outside the caller's scope."""


class IngestDataRejected(InvalidInput):
    """PostgreSQL refused a value of this request (a data error that validation let through),
    written alone: nothing of it is stored."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(
            "the database refused a value of this batch (SQLSTATE "
            f"{sqlstate}, a data error); nothing of it was stored",
            details=[{"field": "body", "message": "a value cannot be stored", "code": sqlstate}],
        )


class IngestFailed(MotorcadeError):
    """The request failed alone for a reason of the server's (the log says which)."""

    message = "internal error: the telemetry was not stored"


def _isolable(exc: Exception) -> bool:
    """Whether a failed group is worth writing request by request: not when the database is
    unavailable (the connection lost, a statement or lock timeout, the pool exhausted: every
    request would meet it, and each answers 503) nor on contention retried to exhaustion."""
    return database_unavailable(exc) is None and sqlstate_of(exc) not in RETRYABLE_SQLSTATES


def _described(exc: Exception) -> dict[str, str | None]:
    """What the log says of a database failure: the driver's error class and SQLSTATE (the
    message may quote the values: never logged)."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return {"error": type(orig).__name__, "sqlstate": sqlstate_of(exc)}


@dataclass(frozen=True)
class IngestConfig:
    queue_max_items: int = DEFAULT_INGEST_QUEUE_MAX_ITEMS
    group_max_items: int = DEFAULT_INGEST_GROUP_MAX_ITEMS
    group_wait_ms: float = DEFAULT_INGEST_GROUP_WAIT_MS
    writers: int = DEFAULT_INGEST_WRITERS
    max_clock_skew_seconds: int = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    policy: WideWritePolicy = field(default_factory=WideWritePolicy)


@dataclass
class _Pending:
    request: GroupRequest
    items: int
    future: asyncio.Future[GroupRequest]


@dataclass
class IngestStats:
    groups: int = 0
    requests: int = 0
    events: int = 0
    heartbeats: int = 0
    overloaded: int = 0
    retries: int = 0
    isolated_groups: int = 0  # groups that failed and were written request by request
    failed_requests: int = 0  # requests that failed alone (422 or 500)
    write_seconds: float = 0.0


# Told, once a group is committed, how many targets it moved per rollout (non-blocking: the
# API's coalesced `outcomes` signals, so the rollouts' gates look again at once).
OutcomesCallback = Callable[[Mapping[int, int]], None]


class TelemetryIngestor:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        config: IngestConfig | None = None,
        *,
        on_outcomes: OutcomesCallback | None = None,
    ) -> None:
        self._sessions = sessions
        self._on_outcomes = on_outcomes
        self.config = config or IngestConfig()
        self._queue: deque[_Pending] = deque()
        self._items = 0  # queued + being written
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.stats = IngestStats()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._closing = False
        for n in range(self.config.writers):
            self._tasks.append(asyncio.create_task(self._writer(), name=f"ingest-writer-{n}"))

    async def stop(self) -> None:
        """Finish what was queued (every waiting request gets its answer), then stop."""
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    @property
    def queued_items(self) -> int:
        return self._items

    # -- submit --------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one queue's worth of writing."""
        rate = self.stats.events + self.stats.heartbeats
        if self.stats.write_seconds <= 0 or rate <= 0:
            return 1
        per_second = rate / self.stats.write_seconds
        return max(1, min(30, round(self._items / per_second)))

    async def submit(
        self, *, batch: TelemetryBatch, scope: Scope, received_at: datetime | None = None
    ) -> GroupRequest:
        """Queue the batch, received at `received_at` (default: now) by the server's clock,
        and wait for its group's commit. A time more than the allowed skew past it is refused
        (422, nothing queued), as is (after the group) an event whose `seq` jumps too far."""
        received_at = received_at or datetime.now(UTC)
        future = future_fields(
            batch, received_at=received_at, max_skew_seconds=self.config.max_clock_skew_seconds
        )
        if future:
            raise InvalidInput(
                f"{future[0]['field']} is {future[0]['message']}; the whole batch is rejected",
                details=future,
            )
        items = max(1, len(batch.events) + len(batch.heartbeats))
        if self._closing or not self._tasks:
            raise IngestOverloaded("telemetry ingestion is shutting down", retry_after=1)
        if self._items + items > self.config.queue_max_items:
            self.stats.overloaded += 1
            OVERLOADED.inc()
            raise IngestOverloaded(
                f"the telemetry queue is full ({self._items:,} items waiting)",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        request = GroupRequest(batch=batch, scope=scope, received_at=received_at)
        pending = _Pending(request, items, loop.create_future())
        self._items += items
        QUEUED_ITEMS.inc(items)
        self._queue.append(pending)
        self._wake.set()
        try:
            # Shielded: a client that disconnects does not cancel the group it is part of.
            done = await asyncio.shield(pending.future)
        finally:
            if not pending.future.done():
                pending.future.add_done_callback(lambda f: f.exception())
        if done.refused is not None:
            raise IngestRefused("the batch names an unknown vehicle", details=done.refused)
        if done.invalid is not None:
            raise InvalidInput(
                f"{done.invalid[0]['field']} jumps too far; the whole batch is rejected",
                details=done.invalid,
            )
        return done

    # -- writers -------------------------------------------------------------------------
    def _take_group(self) -> list[_Pending]:
        group: list[_Pending] = []
        size = 0
        limit = self.config.group_max_items
        while self._queue and (not group or size + self._queue[0].items <= limit):
            item = self._queue.popleft()
            group.append(item)
            size += item.items
        return group

    async def _writer(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            if self.config.group_wait_ms > 0 and not self._closing:
                # Let concurrent requests join this group.
                await asyncio.sleep(self.config.group_wait_ms / 1000)
            group = self._take_group()
            if not group:
                continue
            try:
                await self._write(group)
            except BaseException as exc:
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("stopped")
                        )
                if not isinstance(exc, Exception):
                    raise
            finally:
                done = sum(p.items for p in group)
                self._items -= done
                QUEUED_ITEMS.dec(done)

    async def _write(self, group: list[_Pending]) -> None:
        """Write the group; if it fails for a reason that is not a lost connection or
        contention, write each of its requests alone, so only the guilty one fails."""
        started = time.perf_counter()
        try:
            result = await self._commit(group)
        except Exception as exc:
            if not _isolable(exc):
                why = database_unavailable(exc)  # transient: each request answers 503
                (log.warning if why else log.error)(
                    "telemetry group failed", requests=len(group), why=why, **_described(exc)
                )
                raise
            if len(group) == 1:
                self._fail(group[0], exc)
                return
            log.warning(
                "telemetry group failed; writing its requests one by one",
                requests=len(group),
                **_described(exc),
            )
            self.stats.isolated_groups += 1
            ISOLATED_GROUPS.inc()
            for p in group:
                await self._write_alone(p)
            return
        self._committed(group, result, started)

    async def _write_alone(self, pending: _Pending) -> None:
        """One request of a failed group, in a transaction of its own."""
        started = time.perf_counter()
        try:
            result = await self._commit([pending])
        except Exception as exc:
            if _isolable(exc):
                self._fail(pending, exc)
            else:
                log.error("telemetry request failed", requests=1, **_described(exc))
                pending.future.set_exception(exc)
            return
        self._committed([pending], result, started)

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        """A request that fails on its own: a value PostgreSQL refuses (a data error, SQLSTATE
        class 22 or 23) is the caller's (422); anything else is a fault of ours (500). Logged
        once, by kind and SQLSTATE: never the statement or its values."""
        described = _described(exc)
        state = described["sqlstate"]
        self.stats.failed_requests += 1
        if state is not None and state[:2] in DATA_ERROR_CLASSES:
            FAILED_REQUESTS.labels("data").inc()
            log.warning("telemetry request refused by PostgreSQL", **described)
            pending.future.set_exception(IngestDataRejected(state))
        else:  # a bug stays a bug: a traceback, unless the driver's message may quote values
            FAILED_REQUESTS.labels("internal").inc()
            database = isinstance(exc, DBAPIError | psycopg.Error)
            log.error("telemetry request failed", exc_info=None if database else exc, **described)
            pending.future.set_exception(IngestFailed())

    async def _commit(self, group: list[_Pending]) -> GroupResult:
        """One transaction for the group, again (up to `GROUP_ATTEMPTS`) on a serialization
        failure or deadlock, whether psycopg raised it on the session's own connection (the
        driver statements of services/telemetry) or SQLAlchemy wrapped it (the ORM's)."""
        for attempt in range(GROUP_ATTEMPTS):  # write_group resets each request's counts
            try:
                async with self._sessions() as session:
                    try:
                        result = await write_group(
                            session,
                            requests=[p.request for p in group],
                            policy=self.config.policy,
                        )
                        await session.commit()
                    except BaseException:
                        await session.rollback()
                        raise
                return result
            except Exception as exc:
                if sqlstate_of(exc) in RETRYABLE_SQLSTATES and attempt < GROUP_ATTEMPTS - 1:
                    self.stats.retries += 1
                    await asyncio.sleep(0.01 * (attempt + 1))
                    continue
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _committed(self, group: list[_Pending], result: GroupResult, started: float) -> None:
        elapsed = time.perf_counter() - started
        GROUP_SECONDS.observe(elapsed)
        INGESTED.labels("event").inc(result.events_inserted)
        INGESTED.labels("duplicate").inc(result.duplicates)
        INGESTED.labels("heartbeat").inc(result.heartbeats)
        self.stats.groups += 1
        self.stats.requests += len(group)
        self.stats.events += sum(len(p.request.batch.events) for p in group)
        self.stats.heartbeats += sum(len(p.request.batch.heartbeats) for p in group)
        self.stats.write_seconds += elapsed
        log.debug(
            "telemetry group committed",
            requests=len(group),
            inserted=result.events_inserted,
            duplicates=result.duplicates,
            heartbeats=result.heartbeats,
            vehicles_written=result.vehicles_written,
            ms=round(elapsed * 1000, 1),
            **{k: round(v * 1000, 1) for k, v in result.stats.items()},
        )
        for p in group:  # committed: answered whatever the notification below does
            if not p.future.done():
                p.future.set_result(p.request)
        if result.rollouts_moved and self._on_outcomes is not None:
            try:
                self._on_outcomes(result.rollouts_moved)
            except Exception:  # the rollouts still look again at their next tick
                log.exception("telemetry outcomes notification failed")
