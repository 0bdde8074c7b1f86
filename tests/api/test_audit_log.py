"""GET /audit-log and its NDJSON export on the real app over real PostgreSQL: filters, keyset
pages, scoping (lists and exports), bad input, an export larger than one read batch, and the
retention purge."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit import purge_expired
from tests.api.conftest import bearer
from tests.factories import insert_signed_release, insert_vehicles

URL = "/api/v1/audit-log"
T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def insert_entries(database_url: str, rows: list[dict[str, Any]]) -> None:
    """Audit rows as the writers store them (at, actor, action, target, scope, payload)."""
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_log (at, actor, role, source, action, target_type, target_id,"
            " correlation_id, payload, result, regions)"
            " VALUES (%(at)s, %(actor)s, 'operator', 'api', %(action)s, %(tt)s, %(tid)s,"
            " %(cid)s, '{}'::jsonb, 'ok', %(regions)s)",
            [{"cid": None, "regions": None, "tt": "rollout", "tid": "1", **row} for row in rows],
        )


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def all_pages(http: httpx.AsyncClient, headers: dict, params: dict) -> list[dict]:
    items: list[dict] = []
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await http.get(URL, params=query, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        items += body["data"]
        cursor = body["metadata"]["nextCursor"]
        assert body["metadata"]["hasMore"] == (cursor is not None)
        if cursor is None:
            return items


async def test_filters_and_keyset_pages_newest_first(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    actor = f"{prefix}alice"
    rows: list[dict[str, Any]] = [
        {"at": T0 + timedelta(minutes=i), "actor": actor, "action": a, "tid": str(i % 2)}
        for i, a in enumerate(["rollouts.created", "rollouts.paused"] * 4)
    ]
    insert_entries(database_url, rows)
    insert_entries(database_url, [{"at": T0, "actor": f"{prefix}bob", "action": "x.y"}])

    got = await all_pages(http, viewer, {"actor": actor})
    assert [e["at"] for e in got] == [iso(r["at"]) for r in reversed(rows)]
    assert len({e["id"] for e in got}) == len(rows)
    assert all(e["actor"] == actor for e in got)
    paused = await all_pages(http, viewer, {"actor": actor, "action": "rollouts.paused"})
    assert len(paused) == 4 and {e["action"] for e in paused} == {"rollouts.paused"}
    target = await all_pages(
        http, viewer, {"actor": actor, "targetType": "rollout", "targetId": "1"}
    )
    assert len(target) == 4 and {e["targetId"] for e in target} == {"1"}
    window = await all_pages(
        http,
        viewer,
        {
            "actor": actor,
            "from": iso(T0 + timedelta(minutes=2)),
            "to": iso(T0 + timedelta(minutes=5)),
        },
    )
    assert [e["at"] for e in window] == [iso(T0 + timedelta(minutes=m)) for m in (4, 3, 2)]
    both = await all_pages(http, viewer, {"actor": f"{actor},{prefix}bob"})
    assert len(both) == len(rows) + 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "2026-01-10T12:00:00"}, "from"),  # no zone
        ({"from": "2026-01-11T00:00:00Z", "to": "2026-01-10T00:00:00Z"}, "from"),
        ({"from": "yesterday"}, "from"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": "0"}, "limit"),
    ],
)
async def test_bad_filters_are_422_in_the_envelope(
    http: httpx.AsyncClient, viewer: dict, params: dict, field: str
) -> None:
    for path in (URL, f"{URL}/export"):
        if path.endswith("export") and field in ("cursor", "limit"):
            continue
        r = await http.get(path, params=params, headers=viewer)
        assert r.status_code == 422, (path, params, r.text)
        error = r.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert any(field in d["field"] for d in error["details"]), error


async def test_scoped_callers_see_only_their_entries_in_lists_and_exports(
    http: httpx.AsyncClient, token: Callable[..., str], database_url: str, prefix: str
) -> None:
    actor = f"{prefix}scoper"
    insert_entries(
        database_url,
        [
            {"at": T0, "actor": actor, "action": "a.west", "regions": ["eu-west"]},
            {"at": T0, "actor": actor, "action": "a.both", "regions": ["eu-west", "us-east"]},
            {"at": T0, "actor": actor, "action": "a.east", "regions": ["us-east"]},
            {"at": T0, "actor": actor, "action": "a.global", "regions": None},
        ],
    )
    west = bearer(token("viewer", scopes={"regions": ["eu-west"]}))
    unscoped = bearer(token("viewer"))
    seen = {e["action"] for e in await all_pages(http, west, {"actor": actor})}
    assert seen == {"a.west"}  # "a.both" also names a region outside the scope
    everything = {e["action"] for e in await all_pages(http, unscoped, {"actor": actor})}
    assert everything == {"a.west", "a.both", "a.east", "a.global"}
    r = await http.get(f"{URL}/export", params={"actor": actor}, headers=west)
    assert r.status_code == 200
    assert {json.loads(line)["action"] for line in r.text.splitlines()} == {"a.west"}


async def test_export_streams_every_entry_past_one_read_batch(
    http: httpx.AsyncClient, viewer: dict, database_url: str, prefix: str
) -> None:
    actor = f"{prefix}bulk"
    n = 2_345  # more than two read batches of 1,000
    insert_entries(
        database_url,
        [{"at": T0 + timedelta(seconds=i), "actor": actor, "action": "bulk.x"} for i in range(n)],
    )
    async with http.stream("GET", f"{URL}/export", params={"actor": actor}, headers=viewer) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [line async for line in r.aiter_lines() if line]
    entries = [json.loads(line) for line in lines]
    assert len(entries) == n and len({e["id"] for e in entries}) == n
    assert entries[0]["at"] == iso(T0 + timedelta(seconds=n - 1))  # newest first
    assert entries[-1]["at"] == iso(T0)
    assert set(entries[0]) >= {"id", "at", "actor", "action", "targetType", "payload", "result"}


async def test_a_write_is_in_the_audit_log_with_its_request_id(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    release = f"{prefix}2027.9.9"
    insert_signed_release(database_url, signing_key, release)
    subject = f"{prefix}op"
    operator = bearer(token("operator", subject=subject))
    request_id = f"{prefix}req"
    body = {"releaseVersion": release, "targets": {"vehicleIds": [vid]}, "reason": "audit test"}
    r = await http.post(
        "/api/v1/desired-states", json=body, headers={**operator, "X-Request-ID": request_id}
    )
    assert r.status_code == 201, r.text
    got = await all_pages(http, operator, {"actor": subject, "action": "desired_states.created"})
    assert len(got) == 1
    assert got[0]["correlationId"] == request_id and got[0]["targetId"] == release
    assert got[0]["payload"]["reason"] == "audit test" and got[0]["result"] == "ok"


async def test_a_secret_in_a_write_never_reaches_the_entry(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """A token pasted into a reason is cut out of the stored entry (its `reason` and its
    payload) and so out of the list and the export."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="1.0")
    release = f"{prefix}2027.9.8"
    insert_signed_release(database_url, signing_key, release)
    subject = f"{prefix}leaky"
    operator = bearer(token("operator", subject=subject))
    secret = token("operator")  # a real JWT
    reason = f"hotfix, approved with Bearer {secret} and {secret}"
    body = {"releaseVersion": release, "targets": {"vehicleIds": [vid]}, "reason": reason}
    r = await http.post("/api/v1/desired-states", json=body, headers=operator)
    assert r.status_code == 201, r.text
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT reason, payload::text FROM audit_log WHERE actor = %s", (subject,)
        ).fetchall()
    assert stored and all(secret not in (col or "") for row in stored for col in row)
    assert "[REDACTED]" in stored[0][0]
    listed = await http.get(URL, params={"actor": subject}, headers=operator)
    exported = await http.get(f"{URL}/export", params={"actor": subject}, headers=operator)
    assert listed.status_code == exported.status_code == 200
    assert secret not in listed.text and secret not in exported.text
    assert "hotfix" in listed.json()["data"][0]["reason"]


async def test_retention_purges_only_what_is_older(
    database_url: str, prefix: str, sessions: Any
) -> None:
    actor = f"{prefix}old"
    now = datetime.now(UTC)
    insert_entries(
        database_url,
        [{"at": now - timedelta(days=40 + i), "actor": actor, "action": "old.x"} for i in range(5)]
        + [{"at": now - timedelta(days=10), "actor": actor, "action": "recent.x"}],
    )

    def remaining() -> list[str]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT action FROM audit_log WHERE actor = %s", (actor,))
            return sorted(r[0] for r in rows)

    assert await purge_expired(sessions, retention_days=0) == 0  # the default keeps all
    assert len(remaining()) == 6
    deleted = await purge_expired(sessions, retention_days=30, batch=2)  # several batches
    assert deleted >= 5
    assert remaining() == ["recent.x"]
