"""A stream lives no longer than its credential: a ticket's stream ends when the ticket
expires, a bearer token's at the token's `exp`; the client resumes with a fresh ticket and
`lastEventId=`. Tickets are capped whatever their MAC says, and bad input is a 4xx."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import httpx
import pytest

from core.auth import Principal
from core.settings import Settings
from models.enums import Role
from services import stream
from tests.api.conftest import bearer, serve_app
from tests.api.stream import READ_GUARD, SSE, delta, feed_vehicles, open_stream
from tests.api.test_envelopes import assert_error

TICKET_SECONDS = 5  # short, so a test sees its streams end; long enough to open one under load


@pytest.fixture
async def short(stream_settings: Settings, viewer: dict) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose tickets live TICKET_SECONDS, its stream hub up (a short-lived credential
    must not expire while the app is starting)."""
    quick = stream_settings.model_copy(update={"stream_ticket_seconds": TICKET_SECONDS})
    async with serve_app(quick) as url, httpx.AsyncClient(base_url=url, timeout=READ_GUARD) as c:
        async with open_stream(c, viewer, topics="vehicles"):
            pass
        yield c


async def ticket_for(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[str, float]:
    issued = await client.post("/api/v1/stream/tickets", headers=headers)
    assert issued.status_code == 201, issued.text
    data = issued.json()["data"]
    return data["ticket"], datetime.fromisoformat(data["expiresAt"]).timestamp()


async def until_the_end(sse: SSE, prefix: str) -> list[int]:
    """The ids of this test's events until the server ends the stream (READ_GUARD: a hang)."""
    ids = []
    while (item := await sse.event()) is not None:
        if prefix in str(item.get("data")):
            ids.append(int(item["id"]))
    return ids


async def test_a_ticket_stream_ends_when_the_ticket_expires_and_resumes_with_a_new_one(
    short: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    ticket, expires = await ticket_for(short, viewer)
    assert expires <= time.time() + TICKET_SECONDS + 1
    async with open_stream(short, None, ticket=ticket, topics="vehicles") as sse:
        first = feed_vehicles(database_url, [delta(f"{prefix}1")])
        before = await until_the_end(sse, prefix)  # the server closed it (else READ_GUARD)
    assert time.time() >= expires
    missed = feed_vehicles(database_url, [delta(f"{prefix}2")])
    # The browser's own reconnect (same URL, the ticket expired) is refused ...
    refused = await short.get("/api/v1/stream", params={"ticket": ticket, "topics": "vehicles"})
    assert_error(refused, 401, "UNAUTHENTICATED")
    # ... so the page mints a new ticket and resumes after the last event it received.
    fresh, _ = await ticket_for(short, viewer)
    resume = before[-1] if before else first - 1
    async with open_stream(
        short, None, ticket=fresh, topics="vehicles", lastEventId=str(resume)
    ) as sse:
        after = await until_the_end(sse, prefix)
    # Nothing lost, nothing twice (a loaded machine may deliver `first` only after the end).
    assert before + after == [first, missed]


async def test_a_bearer_stream_ends_at_the_token_exp(
    short: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    headers = bearer(token("viewer", ttl_seconds=TICKET_SECONDS))
    async with open_stream(short, headers, topics="vehicles") as sse:
        first = feed_vehicles(database_url, [delta(f"{prefix}1")])
        assert await until_the_end(sse, prefix) in ([first], [])  # it ends (else READ_GUARD)


async def test_a_token_past_its_exp_opens_no_stream(
    client: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    """A token past its exp but inside the verification's clock-skew leeway still reads, but
    opens no stream (it would end at once, and the client would reconnect in a loop)."""
    late = bearer(token("viewer", ttl_seconds=5, now=time.time() - 10))
    assert (await client.get("/api/v1/vehicles", headers=late)).status_code == 200
    response = await client.get("/api/v1/stream", headers=late)
    body = assert_error(response, 401, "UNAUTHENTICATED")
    assert "expired" in body["error"]["message"]


async def test_a_ticket_never_outlives_the_token_it_was_issued_for(
    client: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    now = time.time()
    _, expires = await ticket_for(client, bearer(token("viewer", ttl_seconds=10)))
    assert expires <= now + 11  # not the 60 s a ticket is otherwise given


async def test_forged_and_malformed_tickets_are_401(
    client: httpx.AsyncClient, dev_key: str
) -> None:
    """A valid MAC is not enough: the lifetime, the role and the shape are checked (what a
    leaked or guessed secret could otherwise mint), and non-ASCII input is a 401, not a 500."""
    secret = stream.ticket_secret(None, dev_key)
    viewer = Principal(subject="someone", role=Role.VIEWER)
    long_lived, _ = stream.issue_ticket(viewer, secret, seconds=7 * 86400)
    backdated, _ = stream.issue_ticket(viewer, secret, seconds=86400, now=time.time() - 86400 + 30)
    device, _ = stream.issue_ticket(Principal(subject="car", role=Role.DEVICE), secret)
    valid, _ = stream.issue_ticket(viewer, secret)
    body, mac = valid.split(".")
    for name, bad, status in (
        ("long-lived", long_lived, 401),
        ("backdated", backdated, 401),
        ("device", device, 401),
        ("non-ascii", "é.é", 401),
        ("non-ascii-mac", f"{body}.{mac[:-1]}é", 401),
        ("superscript", "²", 401),
        ("no-dot", body, 401),
        ("empty-mac", f"{body}.", 401),
        ("too-long", "a" * 2048 + ".b", 422),
    ):
        response = await client.get("/api/v1/stream", params={"ticket": bad})
        assert response.status_code == status, (name, response.text)
        assert_error(response, status, "UNAUTHENTICATED" if status == 401 else "VALIDATION_ERROR")
    async with open_stream(client, None, ticket=valid):  # the same secret's good ticket
        pass
