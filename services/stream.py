"""Live updates: the change feed fanned out to Server-Sent Events subscribers (SPEC.md,
Server-Sent Events; docs/api.md, "Live updates").

One `StreamHub` per API process. It holds ONE listening PostgreSQL connection (`LISTEN
motorcade_change_feed`, notified by a statement-level trigger on `change_feed`, migration 0009)
and one reading connection. Each wake-up reads the new rows once, in id order and in pages, and
fans them out to the in-memory subscribers, each filtered to the subscriber's topics and scope.

Commit order. Ids come from a sequence when a row is inserted, but transactions commit in any
order: a reader that only asks `id > last` would skip a row whose transaction commits after a
later id was read. The hub delivers rows only up to the first hole (an id not visible yet).
Every feed writer holds the feed writers' lock (`pg_advisory_xact_lock_shared(FEED_LOCK)`,
shared, so writers never wait for one another) from before it draws its first feed id to its
end: the statement-level `BEFORE INSERT` trigger on `change_feed` takes it (migration 0016;
migration 0009 made the trigger, which also assigns the transaction its id). A missing id
below a visible one was drawn before that snapshot, so its owner held the lock then. The hub
notes the transactions holding the lock just after the snapshot in which it saw the hole
(`pg_locks`, by virtual transaction id), and waits until none of THOSE holds it any more;
then it takes a new snapshot: a missing id below the greatest id seen with the hole is, still
missing, a rolled-back insert (or a sequence jump) and is skipped. Only feed writers are
waited for: a transaction that never wrote to the feed (`BEGIN; UPDATE vehicles ...` left
open in a psql session, holding an xid) does not hold the lock and does not stall the feed.
A feed writer left open does (its row is not visible yet); the database's
`idle_in_transaction_session_timeout` bounds that. Everything up to the hub's `cursor` is
therefore final, which is what makes resume exact: a subscriber registers (taking the cursor,
no await in between), backfills `(lastEventId, cursor]` from PostgreSQL in pages, then
receives live rows (> cursor): no gap, no duplicate.

Resume reads come from a small pool of their own (`stream_backfill_pool_size` connections,
application_name `motorcade-stream-backfill`), one page per checkout: a burst of reconnecting
clients waits for a connection, it never opens one each. Each page also reads the oldest id
still kept (in the same statement, so the same snapshot): a resume from before it (the
retention purge deleted what it asked for) gets one `resync` event (`EVENTS_EXPIRED`), then
the live events.

Backpressure: each subscriber's queue is bounded in events (`stream_queue_max_events`) and in
bytes as sent (`stream_queue_max_bytes`). A subscriber past either bound is dropped: its queue
is replaced by one final `resync` event (`SLOW_SUBSCRIBER`) and its stream ends. Vehicle
updates arrive as batched rows (up to `VEHICLE_DELTAS_PER_ROW` deltas), so a storm is a
bounded number of events. Each caller (token subject) holds at most `stream_max_per_caller`
streams per API process (`claim`/`release`); one more is refused (429 RATE_LIMITED).

Tickets: HMAC-SHA256 over the caller's subject, role, scopes, issue time and expiry with a
server secret (`MOTORCADE_STREAM_TICKET_SECRET`; every replica with the same secret accepts
them). A ticket lives `MOTORCADE_STREAM_TICKET_SECONDS` at most, never past the token it was
issued for; a longer one is refused even with a valid MAC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sse_starlette import ServerSentEvent

from core.aio import wait_event
from core.auth import Principal, TokenError
from models.enums import Role
from models.scope import Scope
from models.workflows import RolloutCounts
from services.scope import allows_vehicle, names_inside

log = structlog.stdlib.get_logger("motorcade.stream")

CHANNEL = "motorcade_change_feed"
TOPICS = ("vehicles", "rollouts", "audit")
TICKET_SECONDS = 60  # the default of MOTORCADE_STREAM_TICKET_SECONDS
TICKET_LEEWAY_SECONDS = 5  # clock skew between the replica that issues and the one that reads
TICKET_MAX_CHARS = 2048
STREAM_ROLES = frozenset({Role.VIEWER, Role.OPERATOR})  # who may read the stream
PAGE_ROWS = 500
# The feed writers' lock: `pg_advisory_xact_lock_shared(28003, 26211)`, taken by every
# statement that inserts into change_feed (migration 0016); pg_locks shows it as advisory,
# classid 28003, objid 26211, objsubid 2 (the two-key form).
FEED_LOCK = (28003, 26211)
APPLICATION_NAMES = {
    "listen": "motorcade-stream-listen",
    "reader": "motorcade-stream-reader",
    "backfill": "motorcade-stream-backfill",
}

SUBSCRIBERS = Gauge(
    "motorcade_sse_subscribers", "Open Server-Sent Events streams of this API process."
)
DROPPED = Counter(
    "motorcade_sse_dropped_subscribers_total",
    "Streams closed with a resync event because the subscriber fell behind its queue bound.",
)
REFUSED = Counter(
    "motorcade_sse_refused_total",
    "Streams refused (429) because their caller already held MOTORCADE_STREAM_MAX_PER_CALLER.",
)
DELIVERED = Counter(
    "motorcade_sse_events_total", "Events put on subscribers' queues (after scope filtering)."
)


# --- tickets --------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ticket_secret(configured: str | None, dev_key: str | None) -> bytes:
    """The configured secret; else one derived from the dev key (all dev replicas agree);
    else a random per-process secret (tickets then work only on the replica that issued
    them: set MOTORCADE_STREAM_TICKET_SECRET when running several)."""
    if configured:
        return configured.encode()
    if dev_key:
        return hmac.new(dev_key.encode(), b"motorcade stream tickets", hashlib.sha256).digest()
    return secrets.token_bytes(32)


def issue_ticket(
    principal: Principal,
    secret: bytes,
    *,
    seconds: int = TICKET_SECONDS,
    now: float | None = None,
) -> tuple[str, datetime]:
    """A ticket for `principal`, valid `seconds` and never past its token's own expiry."""
    issued = int(time.time() if now is None else now)
    expires = issued + seconds
    if principal.expires_at is not None:
        expires = max(issued, min(expires, int(principal.expires_at)))
    claims = {
        "sub": principal.subject,
        "role": principal.role.value,
        "regions": list(principal.regions) if principal.regions is not None else None,
        "models": list(principal.models) if principal.models is not None else None,
        "orgs": list(principal.orgs) if principal.orgs is not None else None,
        "iat": issued,
        "exp": expires,
        "n": _b64(secrets.token_bytes(9)),
    }
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}", datetime.fromtimestamp(expires, UTC)


def _ticket_dims(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenError("the ticket is malformed")
    return tuple(value)


def _ticket_int(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise TokenError("the ticket is malformed")
    return value


def verify_ticket(
    ticket: str, secret: bytes, *, max_seconds: int = TICKET_SECONDS, now: float | None = None
) -> Principal:
    """The caller a ticket was issued to, or TokenError (401). Refused besides a bad MAC:
    anything not ASCII or not shaped as `issue_ticket` makes it, a role that may not read the
    stream, and a lifetime (from issue to expiry, and from now to expiry) longer than
    `max_seconds` plus a few seconds of clock skew between replicas: a ticket minted with a
    leaked secret cannot be made to live long."""
    if len(ticket) > TICKET_MAX_CHARS or not ticket.isascii():
        raise TokenError("the ticket is malformed")
    body, dot, mac = ticket.partition(".")
    if not dot or not body or not mac:
        raise TokenError("the ticket is malformed")
    expected = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        raise TokenError("the ticket is not valid")
    try:
        claims = json.loads(_unb64(body))
    except ValueError as exc:
        raise TokenError("the ticket is malformed") from exc
    if not isinstance(claims, dict):
        raise TokenError("the ticket is malformed")
    issued, expires = _ticket_int(claims, "iat"), _ticket_int(claims, "exp")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("the ticket is malformed")
    try:
        role = Role(str(claims.get("role")))
    except (ValueError, TypeError):
        raise TokenError("the ticket is malformed") from None
    if role not in STREAM_ROLES:
        raise TokenError(f"a ticket for the {role.value} role is not accepted")
    current = time.time() if now is None else now
    longest = max_seconds + TICKET_LEEWAY_SECONDS
    if expires - issued > longest or expires - current > longest:
        raise TokenError("the ticket's lifetime is longer than a ticket's")
    if issued > current + TICKET_LEEWAY_SECONDS:
        raise TokenError("the ticket was issued in the future")
    if expires <= current:
        raise TokenError("the ticket has expired")
    return Principal(
        subject=subject,
        role=role,
        regions=_ticket_dims(claims, "regions"),
        models=_ticket_dims(claims, "models"),
        orgs=_ticket_dims(claims, "orgs"),
        expires_at=float(expires),
    )


@contextlib.asynccontextmanager
async def _snapshot(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """A read-only transaction that sees one snapshot throughout (what the feed's cursor and
    its holes are judged by)."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


@dataclass
class Event:
    id: int
    event: str
    data: dict[str, Any]
    _wire: bytes | None = field(default=None, repr=False, compare=False)

    def wire(self) -> bytes:
        """The event as sent (`id`, `event`, one `data` line of compact JSON); encoded once
        however many subscribers receive the same event."""
        if self._wire is None:
            self._wire = ServerSentEvent(
                data=json.dumps(self.data, separators=(",", ":"), default=str),
                event=self.event,
                id=str(self.id) if self.id else None,
            ).encode()
        return self._wire


RESYNC = "resync"


# What every `rollout.updated` carries since 1.6.0, for rows written before it (the feed
# keeps 24 h): a creation row had only id, status and stage; every row had `counts`, not
# `progress`.
_ROLLOUT_FIELDS = {
    "statusReason": None,
    "stage": None,
    "stageIndex": 0,
    "stageCount": 0,
    "waitingFor": None,
}


def current_shape(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feed rows as read, each payload in the shape events have now: once per row where
    it is read (live or resumed), not once per subscriber."""
    for row in rows:
        payload = row["payload"]
        if row["event"] == "rollout.updated" and payload is not None and "progress" not in payload:
            progress = payload.get("counts") or RolloutCounts().model_dump()
            row["payload"] = {**_ROLLOUT_FIELDS, **payload, "progress": progress}
    return rows


def scoped_event(row: dict[str, Any], scope: Scope, rollout_scopes: dict[str, Any]) -> Any:
    """The event of a feed row as a subscriber with this scope sees it, or None."""
    payload = row["payload"] or {}
    if scope.unrestricted:
        shared = row.get("_event")
        if shared is None:  # one Event (and one encoding) per row for every such subscriber
            shared = row["_event"] = Event(row["id"], row["event"], payload)
        return shared
    if row["event"] == "vehicle.updated" and "vehicles" in payload:
        deltas = [
            d
            for d in payload["vehicles"]
            if allows_vehicle(scope, region=d.get("region"), model=d.get("model"), org=d.get("org"))
        ]
        if not deltas:
            return None
        return Event(row["id"], row["event"], {**payload, "vehicles": deltas})
    if any(row.get(k) is not None for k in ("region", "model", "org")):
        if not allows_vehicle(scope, region=row["region"], model=row["model"], org=row["org"]):
            return None
        return Event(row["id"], row["event"], payload)
    if row["topic"] == "rollouts":
        if not names_inside(rollout_scopes.get(row["entity_id"] or ""), scope):
            return None
        return Event(row["id"], row["event"], payload)
    if row["topic"] == "audit":
        if not names_inside(payload.get("scope"), scope):
            return None
        return Event(row["id"], row["event"], payload)
    if row["event"] == "fleet.summary":
        # A prompt to re-read GET /fleet/summary (which is scoped); it carries no counts.
        return Event(row["id"], row["event"], payload)
    return None


# --- subscribers ----------------------------------------------------------------------------


@dataclass(eq=False)
class Subscriber:
    topics: frozenset[str]
    scope: Scope
    bound: int
    max_bytes: int = 8 << 20
    queue: asyncio.Queue[Event] = field(init=False)
    after: int = 0  # never deliver an id at or below this (dedup against the backfill)
    dropped: bool = False
    queued_bytes: int = 0  # the encoded size of what is queued, unread

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.bound + 1)  # +1: room for the final resync

    def offer(self, row: dict[str, Any], rollout_scopes: dict[str, Any]) -> None:
        if self.dropped or row["topic"] not in self.topics or row["id"] <= self.after:
            return
        event = scoped_event(row, self.scope, rollout_scopes)
        if event is None:
            return
        size = len(event.wire())
        if self.queue.qsize() >= self.bound or self.queued_bytes + size > self.max_bytes:
            self.drop()
            return
        self.queue.put_nowait(event)
        self.queued_bytes += size
        DELIVERED.inc()

    async def get(self) -> Event:
        return self._taken(await self.queue.get())

    def get_nowait(self) -> Event:
        return self._taken(self.queue.get_nowait())

    def _taken(self, event: Event) -> Event:
        if event.id:
            self.queued_bytes -= len(event.wire())
        return event

    def stop(self) -> None:
        """End the stream after what it has queued (the server is stopping)."""
        self.dropped = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(Event(0, "", {}))

    def drop(self) -> None:
        """Too far behind: forget what it has not read, tell it to resync, end its stream."""
        self.dropped = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queued_bytes = 0
        self.queue.put_nowait(Event(0, RESYNC, {"reason": "SLOW_SUBSCRIBER"}))
        DROPPED.inc()


# --- the hub --------------------------------------------------------------------------------

_READ = """
    SELECT id, topic, event, entity_id, payload, region, model, org
    FROM change_feed WHERE id > %(after)s AND id <= %(upto)s ORDER BY id LIMIT %(limit)s
"""
# A resume page and the oldest id still kept, in one statement (one snapshot): rows the
# retention purge deleted before this read show as `oldest` above what was asked for.
_RESUME_PAGE = """
    SELECT page.*, kept.oldest FROM (SELECT min(id) AS oldest FROM change_feed) kept
    LEFT JOIN LATERAL (
        SELECT id, topic, event, entity_id, payload, region, model, org
        FROM change_feed WHERE id > %(after)s AND id <= %(upto)s ORDER BY id LIMIT %(limit)s
    ) page ON true
    ORDER BY page.id
"""
# The transactions holding the feed writers' lock now (virtual transaction ids: unique while
# the server runs; a prepared transaction's too).
_FEED_WRITERS = f"""
    SELECT virtualtransaction FROM pg_locks
    WHERE locktype = 'advisory' AND classid = {FEED_LOCK[0]} AND objid = {FEED_LOCK[1]}
      AND objsubid = 2
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


class HistoryExpired(Exception):
    """A resume asked for rows the retention purge has deleted (or never kept)."""


@dataclass
class _Hole:
    """The first id the hub cannot see yet, and what it waits for before skipping it."""

    first: int
    upto: int  # the greatest id visible with it: every missing id below was drawn by then
    writers: frozenset[str] | None = None  # feed writers in progress just after that snapshot
    resolved: bool = False  # all of them have ended, before the current snapshot was taken


class StreamHub:
    def __init__(
        self,
        conninfo: str,
        *,
        queue_max_events: int = 1000,
        queue_max_bytes: int = 8 << 20,
        poll_seconds: float = 5.0,
        options: str = "",
        max_per_caller: int = 0,
        backfill_pool_size: int = 4,
        backfill_wait_seconds: float = 10.0,
    ) -> None:
        self.conninfo = conninfo
        # libpq `options` of every connection of the hub (core.db.connection_options, role
        # `listen`): a statement timeout, no idle-in-transaction timeout (the LISTEN connection
        # idles outside any transaction by design).
        self.options = options
        self.queue_max_events = queue_max_events
        self.queue_max_bytes = queue_max_bytes
        self.poll_seconds = poll_seconds
        self.max_per_caller = max_per_caller  # 0: no cap
        self.cursor = 0  # every id <= cursor is final (delivered, or a rolled-back hole)
        self.subscribers: set[Subscriber] = set()
        self.per_caller: dict[str, int] = {}
        self._rollout_scopes: dict[str, Any] = {}
        self._hole: _Hole | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listen: psycopg.AsyncConnection[Any] | None = None
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._backfill: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] = (
            AsyncConnectionPool(
                conninfo,
                min_size=0,
                max_size=backfill_pool_size,
                timeout=backfill_wait_seconds,
                # A connection that died while idle (a PostgreSQL restart, a terminated
                # backend) is replaced at checkout, not handed to a resume that then fails.
                check=AsyncConnectionPool.check_connection,
                open=False,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "application_name": APPLICATION_NAMES["backfill"],
                    "options": options,
                },
                name="stream-backfill",
            )
        )
        self._closed = False
        self._started = False
        self.advanced = asyncio.Condition()

    @property
    def ready(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Start in the background: the API starts (and /readyz answers) without PostgreSQL;
        streams answer 503 until the hub has connected."""
        await self._backfill.open(wait=False)
        self._tasks = [asyncio.create_task(self._run(), name="stream-hub")]

    async def _connect(self) -> None:
        self._reader = await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            row_factory=dict_row,
            application_name=APPLICATION_NAMES["reader"],
            options=self.options,
        )
        self._listen = await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            application_name=APPLICATION_NAMES["listen"],
            options=self.options,
        )
        await self._listen.execute(f"LISTEN {CHANNEL}")
        if not self._started:
            # Start at the newest row visible now; rows below it may belong to feed writers
            # still open, so the hub is ready (streams are served) only once those have
            # ended: then every id up to the cursor is final, as the cursor promises.
            conn = self._reader
            async with _snapshot(conn):
                row = await (
                    await conn.execute("SELECT coalesce(max(id), 0) AS m FROM change_feed")
                ).fetchone()
            assert row is not None
            writers = await self._feed_writers(conn)
            while True:
                if not writers & await self._feed_writers(conn):
                    break
                await asyncio.sleep(0.05)
            self.cursor = int(row["m"])
            self._started = True

    async def _feed_writers(self, conn: psycopg.AsyncConnection[Any]) -> frozenset[str]:
        rows = await (await conn.execute(_FEED_WRITERS)).fetchall()
        return frozenset(r["virtualtransaction"] for r in rows)

    async def _close_connections(self) -> None:
        for conn in (self._listen, self._reader):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._listen = self._reader = None

    def backend_pids(self) -> list[int]:
        """The PostgreSQL backends of the hub's connections (for operators and tests)."""
        return [c.info.backend_pid for c in (self._listen, self._reader) if c is not None]

    @property
    def connections_open(self) -> int:
        return sum(1 for c in (self._listen, self._reader) if c is not None and not c.closed)

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._connect()
                self._wake.set()  # rows written while (re)connecting are read by id
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._listen_loop())
                    group.create_task(self._read_loop())
            except asyncio.CancelledError:
                raise
            except BaseException:
                log.warning("stream hub lost PostgreSQL; reconnecting", exc_info=True)
            await self._close_connections()
            await asyncio.sleep(1)

    async def stop(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in list(self.subscribers):
            sub.stop()
        await self._close_connections()
        with contextlib.suppress(Exception):
            await self._backfill.close()

    # The per-caller cap: the route claims before it answers and releases when the response
    # ends (StreamResponse), so a refused stream costs no subscription.
    def claim(self, caller: str) -> bool:
        held = self.per_caller.get(caller, 0)
        if self.max_per_caller and held >= self.max_per_caller:
            REFUSED.inc()
            return False
        self.per_caller[caller] = held + 1
        return True

    def release(self, caller: str) -> None:
        held = self.per_caller.get(caller, 0) - 1
        if held > 0:
            self.per_caller[caller] = held
        else:
            self.per_caller.pop(caller, None)

    # Subscribers register and take the cursor in one synchronous step (no await between).
    def subscribe(self, topics: frozenset[str], scope: Scope) -> tuple[Subscriber, int]:
        sub = Subscriber(
            topics=topics,
            scope=scope,
            bound=self.queue_max_events,
            max_bytes=self.queue_max_bytes,
        )
        sub.after = self.cursor
        self.subscribers.add(sub)
        SUBSCRIBERS.set(len(self.subscribers))
        return sub, self.cursor

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        SUBSCRIBERS.set(len(self.subscribers))

    async def _listen_loop(self) -> None:
        assert self._listen is not None
        async for _ in self._listen.notifies():
            self._wake.set()

    async def _read_loop(self) -> None:
        while True:
            await wait_event(self._wake, self.poll_seconds)
            self._wake.clear()
            if await self.advance():
                self._wake.set()

    async def advance(self) -> bool:
        """Read and fan out the rows after the cursor, up to the first unresolved hole.
        True when there may be more to read right away (a full page, or a hole to wait on)."""
        assert self._reader is not None
        conn = self._reader
        hole = self._hole
        if hole is not None and hole.writers is not None and not hole.resolved:
            # Before the snapshot: once none of the hole's possible owners holds the lock,
            # the snapshot below sees the rows of those that committed.
            hole.resolved = not (hole.writers & await self._feed_writers(conn))
        async with _snapshot(conn):
            rows = current_shape(
                await (
                    await conn.execute(
                        _READ, {"after": self.cursor, "upto": 2**62, "limit": PAGE_ROWS}
                    )
                ).fetchall()
            )
            deliver: list[dict[str, Any]] = []
            expected = self.cursor + 1
            waiting = False
            for row in rows:
                if row["id"] != expected:
                    hole = self._hole
                    covered = hole is not None and row["id"] - 1 <= hole.upto
                    if not (covered and hole is not None and hole.resolved):
                        if covered and hole is not None:
                            hole.first = expected  # drawn before the hole's snapshot too
                        else:
                            self._hole = _Hole(first=expected, upto=rows[-1]["id"])
                        waiting = True  # a feed writer that may own the hole is still open
                        break
                    # Every possible owner has ended and the id is still missing: rolled back
                    # (or a sequence jump): skip it.
                deliver.append(row)
                expected = row["id"] + 1
            await self._load_rollout_scopes(conn, deliver)
        if waiting and self._hole is not None and self._hole.writers is None:
            # After the snapshot: the feed writers in progress when it was taken (the hole's
            # owner among them) hold the lock now, or have ended.
            self._hole.writers = await self._feed_writers(conn)
        for row in deliver:
            for sub in list(self.subscribers):
                sub.offer(row, self._rollout_scopes)
        if deliver:
            self.cursor = deliver[-1]["id"]
            if self._hole is not None and not waiting and self.cursor >= self._hole.upto:
                self._hole = None
            async with self.advanced:
                self.advanced.notify_all()
        if waiting:
            await asyncio.sleep(0.02)  # re-check the hole shortly (bounded by feed writers)
        return waiting or len(rows) == PAGE_ROWS

    async def backfill(
        self, *, after: int, upto: int, sub: Subscriber
    ) -> AsyncIterator[list[Event]]:
        """Rows in (after, upto], final by construction, in pages, filtered for `sub`; each
        page read on a pooled connection, returned before the page is sent. HistoryExpired
        when a row asked for is no longer kept (the purge's deletes start at the oldest row,
        so a gap below the oldest kept id is history deleted)."""
        while after < upto:
            async with self._backfill.connection() as conn:
                rows = await (
                    await conn.execute(
                        _RESUME_PAGE, {"after": after, "upto": upto, "limit": PAGE_ROWS}
                    )
                ).fetchall()
                oldest = rows[0]["oldest"] if rows else None
                if oldest is None or after < int(oldest) - 1:
                    raise HistoryExpired
                rows = current_shape([r for r in rows if r["id"] is not None])
                if not rows:
                    return
                after = rows[-1]["id"]
                await self._load_rollout_scopes(conn, rows)
            page = []
            for row in rows:
                if row["topic"] not in sub.topics:
                    continue
                event = scoped_event(row, sub.scope, self._rollout_scopes)
                if event is not None:
                    page.append(event)
            yield page

    async def _load_rollout_scopes(
        self, conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]]
    ) -> None:
        """The targets (regions, models, orgs) of the rollouts these rows are about: what
        scopes a rollout row. Cached: a rollout's targets do not change once created."""
        ids = {
            int(r["entity_id"])
            for r in rows
            if r["topic"] == "rollouts"
            and str(r["entity_id"] or "").isdigit()
            and str(r["entity_id"]) not in self._rollout_scopes
        }
        if not ids:
            return
        cur = await conn.execute(
            "SELECT id, targets FROM rollouts WHERE id = ANY(%(ids)s)", {"ids": sorted(ids)}
        )
        if len(self._rollout_scopes) > 10_000:
            self._rollout_scopes.clear()
        for r in await cur.fetchall():
            self._rollout_scopes[str(r["id"])] = r["targets"] or {}
