"""Live updates: the change feed fanned out to Server-Sent Events subscribers (SPEC.md,
Server-Sent Events; docs/api.md, "Live updates").

One `StreamHub` per API process. It holds ONE listening PostgreSQL connection (`LISTEN
motorcade_change_feed`, notified by a statement-level trigger on `change_feed`, migration 0009)
and one reading connection. Each wake-up reads the new rows once, in id order and in pages, and
fans them out to the in-memory subscribers, each filtered to the subscriber's topics and scope.

Commit order. Ids come from a sequence when a row is inserted, but transactions commit in any
order: a reader that only asks `id > last` would skip a row whose transaction commits after a
later id was read. The hub delivers rows only up to the first hole (an id not visible yet). A
hole is waited for until every transaction that was in progress when the hole was first seen
has ended (`pg_snapshot_xmin` of a later snapshot reaches the `pg_snapshot_xmax` of that one):
the row's transaction had taken its id before a later id was visible, so it was one of them.
Then the hole is read once more and, still empty, is a rolled-back insert: skipped. Everything
up to the hub's `cursor` is therefore final, which is what makes resume exact: a subscriber
registers (taking the cursor, no await in between), backfills `(lastEventId, cursor]` from
PostgreSQL in pages, then receives live rows (> cursor): no gap, no duplicate.

The premise: a transaction holds its transaction id before it draws a feed id. A
statement-level `BEFORE INSERT` trigger on `change_feed` (migration 0009) calls
`pg_current_xact_id()`, which assigns one, before the statement evaluates any row's id.

Backpressure: each subscriber's queue is bounded (`stream_queue_max_events`). A subscriber
whose queue is full is dropped: its queue is replaced by one final `resync` event and its
stream ends. Vehicle updates arrive as batched rows (up to `VEHICLE_DELTAS_PER_ROW` deltas),
so a storm is a bounded number of events.

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
from sse_starlette import ServerSentEvent

from core.auth import Principal, TokenError
from models.enums import Role
from models.scope import Scope
from services.scope import allows_vehicle, names_inside

log = structlog.stdlib.get_logger("motorcade.stream")

CHANNEL = "motorcade_change_feed"
TOPICS = ("vehicles", "rollouts", "audit")
TICKET_SECONDS = 60  # the default of MOTORCADE_STREAM_TICKET_SECONDS
TICKET_LEEWAY_SECONDS = 5  # clock skew between the replica that issues and the one that reads
TICKET_MAX_CHARS = 2048
STREAM_ROLES = frozenset({Role.VIEWER, Role.OPERATOR})  # who may read the stream
PAGE_ROWS = 500

SUBSCRIBERS = Gauge(
    "motorcade_sse_subscribers", "Open Server-Sent Events streams of this API process."
)
DROPPED = Counter(
    "motorcade_sse_dropped_subscribers_total",
    "Streams closed with a resync event because the subscriber fell behind its queue bound.",
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
    queue: asyncio.Queue[Event] = field(init=False)
    after: int = 0  # never deliver an id at or below this (dedup against the backfill)
    dropped: bool = False

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.bound + 1)  # +1: room for the final resync

    def offer(self, row: dict[str, Any], rollout_scopes: dict[str, Any]) -> None:
        if self.dropped or row["topic"] not in self.topics or row["id"] <= self.after:
            return
        event = scoped_event(row, self.scope, rollout_scopes)
        if event is None:
            return
        if self.queue.qsize() >= self.bound:
            self.drop()
            return
        self.queue.put_nowait(event)
        DELIVERED.inc()

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
        self.queue.put_nowait(Event(0, RESYNC, {"reason": "SLOW_SUBSCRIBER"}))
        DROPPED.inc()


# --- the hub --------------------------------------------------------------------------------

_READ = """
    SELECT id, topic, event, entity_id, payload, region, model, org
    FROM change_feed WHERE id > %(after)s AND id <= %(upto)s ORDER BY id LIMIT %(limit)s
"""


class StreamHub:
    def __init__(
        self,
        conninfo: str,
        *,
        queue_max_events: int = 1000,
        poll_seconds: float = 5.0,
        options: str = "",
    ) -> None:
        self.conninfo = conninfo
        # libpq `options` of every connection of the hub (core.db.connection_options, role
        # `listen`): a statement timeout, no idle-in-transaction timeout (the LISTEN connection
        # idles outside any transaction by design).
        self.options = options
        self.queue_max_events = queue_max_events
        self.poll_seconds = poll_seconds
        self.cursor = 0  # every id <= cursor is final (delivered, or a rolled-back hole)
        self.subscribers: set[Subscriber] = set()
        self._rollout_scopes: dict[str, Any] = {}
        self._hole: tuple[int, int] | None = None  # (first missing id, xmax when first seen)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listen: psycopg.AsyncConnection[Any] | None = None
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._closed = False
        self._started = False
        self.advanced = asyncio.Condition()

    @property
    def ready(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Start in the background: the API starts (and /readyz answers) without PostgreSQL;
        streams answer 503 until the hub has connected."""
        self._tasks = [asyncio.create_task(self._run(), name="stream-hub")]

    async def _connect(self) -> None:
        self._reader = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, row_factory=dict_row, options=self.options
        )
        self._listen = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, options=self.options
        )
        await self._listen.execute(f"LISTEN {CHANNEL}")
        if not self._started:
            # Start at the newest row visible now; rows below it may belong to transactions
            # still open, so the hub is ready (streams are served) only once all of those
            # have ended: then every id up to the cursor is final, as the cursor promises.
            conn = self._reader
            async with _snapshot(conn):
                row = await (
                    await conn.execute(
                        "SELECT coalesce(max(id), 0) AS m,"
                        " pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax"
                        " FROM change_feed"
                    )
                ).fetchone()
            assert row is not None
            while True:
                now = await (
                    await conn.execute(
                        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin"
                    )
                ).fetchone()
                assert now is not None
                if int(now["xmin"]) >= int(row["xmax"]):
                    break
                await asyncio.sleep(0.05)
            self.cursor = int(row["m"])
            self._started = True

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

    # Subscribers register and take the cursor in one synchronous step (no await between).
    def subscribe(self, topics: frozenset[str], scope: Scope) -> tuple[Subscriber, int]:
        sub = Subscriber(topics=topics, scope=scope, bound=self.queue_max_events)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            self._wake.clear()
            if await self.advance():
                self._wake.set()

    async def advance(self) -> bool:
        """Read and fan out the rows after the cursor, up to the first unresolved hole.
        True when there may be more to read right away (a full page, or a hole to wait on)."""
        assert self._reader is not None
        conn = self._reader
        async with _snapshot(conn):
            snap = await (
                await conn.execute(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,"
                    " pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax"
                )
            ).fetchone()
            assert snap is not None
            rows = await (
                await conn.execute(_READ, {"after": self.cursor, "upto": 2**62, "limit": PAGE_ROWS})
            ).fetchall()
            deliver: list[dict[str, Any]] = []
            expected = self.cursor + 1
            waiting = False
            for row in rows:
                if row["id"] != expected:
                    if self._hole is None or self._hole[0] != expected:
                        self._hole = (expected, int(snap["xmax"]))
                    if int(snap["xmin"]) < self._hole[1]:
                        waiting = True  # a transaction that may own the hole is still open
                        break
                    self._hole = None  # rolled back (or a sequence jump): skip it
                deliver.append(row)
                expected = row["id"] + 1
            await self._load_rollout_scopes(conn, deliver)
        for row in deliver:
            for sub in list(self.subscribers):
                sub.offer(row, self._rollout_scopes)
        if deliver:
            self.cursor = deliver[-1]["id"]
            async with self.advanced:
                self.advanced.notify_all()
        if waiting:
            await asyncio.sleep(0.02)  # re-check the hole shortly (bounded by open transactions)
        return waiting or len(rows) == PAGE_ROWS

    async def backfill(
        self, *, after: int, upto: int, sub: Subscriber
    ) -> AsyncIterator[list[Event]]:
        """Rows in (after, upto], final by construction, in pages, filtered for `sub`."""
        async with await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, row_factory=dict_row, options=self.options
        ) as conn:
            while after < upto:
                rows = await (
                    await conn.execute(_READ, {"after": after, "upto": upto, "limit": PAGE_ROWS})
                ).fetchall()
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

    async def oldest_id(self) -> int | None:
        async with await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, options=self.options
        ) as conn:
            row = await (await conn.execute("SELECT min(id) FROM change_feed")).fetchone()
            return None if row is None or row[0] is None else int(row[0])
