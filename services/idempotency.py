"""Idempotency keys of POST requests (SPEC.md, Conventions; Stripe's published semantics).

One row per (caller, key) in `idempotency_keys`: the request's fingerprint (a sha256, never
the body itself), its state (`in_flight`, then `completed` with the first response) and when
it expires. Each function runs in the caller's session and only flushes; the API middleware
(api/idempotency.py) gives each step a short transaction of its own, so a concurrent
duplicate sees the `in_flight` row at once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

IN_FLIGHT = "in_flight"
COMPLETED = "completed"


@dataclass(frozen=True)
class StoredResponse:
    """The first response to a key: replayed as it was (headers without Content-Length)."""

    status: int
    headers: list[tuple[str, str]]
    body: str

    def as_json(self) -> dict[str, Any]:
        return {"headers": [list(h) for h in self.headers], "body": self.body}

    @classmethod
    def from_row(cls, status: int, stored: dict[str, Any]) -> StoredResponse:
        headers = [(str(k), str(v)) for k, v in stored.get("headers", [])]
        return cls(status=status, headers=headers, body=str(stored.get("body", "")))


@dataclass(frozen=True)
class Claim:
    """What a request under a key may do: `new` (it owns the key under `token`: run it),
    `replay` (send `response`), `mismatch` (the key was used for another request),
    `in_flight` (a request under this key is still running), `executed` (a request under this
    key committed its work but its response was never stored: its process died in between;
    `resource` and `status` say what it created, when the route named it)."""

    outcome: Literal["new", "replay", "mismatch", "in_flight", "executed"]
    response: StoredResponse | None = None
    token: uuid.UUID | None = None
    resource: str | None = None
    status: int | None = None


def fingerprint(*, method: str, path: str, query: str, body: bytes) -> str:
    """sha256 of the request: method, path, query string and body. A JSON body is
    canonicalized first (key order and whitespace do not matter)."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


# A takeover draws a new token (the fence): the previous holder's complete, release and
# execution mark then match no row. A key whose work committed (`executed_at`) is never taken
# over before it expires, however long ago it was claimed.
_CLAIM = text(
    """
    INSERT INTO idempotency_keys
        (caller, key, method, path, request_hash, state, created_at, expires_at, token)
    VALUES (:caller, :key, :method, :path, :hash, 'in_flight', now(), now() + :retention,
            gen_random_uuid())
    ON CONFLICT (caller, key) DO UPDATE SET
        method = excluded.method,
        path = excluded.path,
        request_hash = excluded.request_hash,
        state = 'in_flight',
        response_status = NULL,
        response_body = NULL,
        created_at = now(),
        expires_at = excluded.expires_at,
        token = excluded.token,
        executed_at = NULL,
        resource = NULL
    WHERE idempotency_keys.expires_at <= now()
       OR (idempotency_keys.state = 'in_flight'
           AND idempotency_keys.executed_at IS NULL
           AND idempotency_keys.created_at < now() - :stale_after
           AND idempotency_keys.request_hash = excluded.request_hash)
    RETURNING token
    """
)

_EXISTING = text(
    "SELECT request_hash, state, response_status, response_body, executed_at, resource,"
    " created_at < now() - :stale_after AS stale"
    " FROM idempotency_keys WHERE caller = :caller AND key = :key"
)


async def claim(
    session: AsyncSession,
    *,
    caller: str,
    key: str,
    method: str,
    path: str,
    request_hash: str,
    retention: timedelta,
    stale_after: timedelta,
) -> Claim:
    """Take the key for this request, or say why not. An expired key is taken over (as if
    absent); so is one left `in_flight` for longer than `stale_after` with the same request
    and no committed work (its process died before its transaction committed). One with
    committed work is `executed` once past `stale_after` (never run again), `in_flight`
    before (its first request may still answer). The new
    claim's `token` is what `complete`, `release` and `mark_executed` must present."""
    params = {
        "caller": caller,
        "key": key,
        "method": method,
        "path": path,
        "hash": request_hash,
        "retention": retention,
        "stale_after": stale_after,
    }
    conn = await session.connection()
    for _ in range(3):  # the row may vanish in between (its first request failed: released)
        taken = (await conn.execute(_CLAIM, params)).first()
        if taken is not None:
            return Claim("new", token=taken[0])
        row = (
            await conn.execute(
                _EXISTING, {"caller": caller, "key": key, "stale_after": stale_after}
            )
        ).first()
        if row is None:
            continue
        stored_hash, state, status, body, executed_at, resource, stale = row
        if stored_hash != request_hash:
            return Claim("mismatch")
        if state == COMPLETED and status is not None:
            return Claim("replay", StoredResponse.from_row(int(status), body or {}))
        # Committed work whose answer never came: once the first request is past
        # `stale_after` (its process died); before that it may still be answering.
        if executed_at is not None and stale:
            return Claim("executed", resource=resource, status=status)
        return Claim("in_flight")
    return Claim("in_flight")


async def complete(
    session: AsyncSession,
    *,
    caller: str,
    key: str,
    token: uuid.UUID,
    response: StoredResponse,
) -> bool:
    """Store the first response under the key, if `token` still holds it; False (nothing
    changed) when a retry took the key over in the meantime."""
    conn = await session.connection()
    result = await conn.execute(
        text(
            "UPDATE idempotency_keys SET state = 'completed', response_status = :status,"
            " response_body = CAST(:body AS jsonb)"
            " WHERE caller = :caller AND key = :key AND token = :token"
            " AND state = 'in_flight'"
        ),
        {
            "caller": caller,
            "key": key,
            "token": token,
            "status": response.status,
            "body": json.dumps(response.as_json()),
        },
    )
    return bool(getattr(result, "rowcount", 0))


async def release(session: AsyncSession, *, caller: str, key: str, token: uuid.UUID) -> bool:
    """Forget an in-flight key whose request answered an error (nothing stored: the client may
    retry under the same key), if `token` still holds it; False (nothing changed) when a
    retry took the key over in the meantime."""
    conn = await session.connection()
    result = await conn.execute(
        text(
            "DELETE FROM idempotency_keys"
            " WHERE caller = :caller AND key = :key AND token = :token AND state = 'in_flight'"
        ),
        {"caller": caller, "key": key, "token": token},
    )
    return bool(getattr(result, "rowcount", 0))


async def purge_expired(
    session: AsyncSession, *, now: datetime | None = None, batch: int = 5000
) -> int:
    """Delete the keys that expired before `now` (default: the database's clock), in batches
    over the `(expires_at)` index; returns how many were deleted. The caller commits."""
    conn = await session.connection()
    total = 0
    while True:
        result = await conn.execute(
            text(
                """
                DELETE FROM idempotency_keys k
                USING (
                    SELECT caller, key FROM idempotency_keys
                    WHERE expires_at <= coalesce(CAST(:now AS timestamptz), now())
                    ORDER BY expires_at
                    LIMIT :batch
                ) old
                WHERE k.caller = old.caller AND k.key = old.key
                """
            ),
            {"now": now, "batch": batch},
        )
        deleted = int(getattr(result, "rowcount", 0) or 0)
        total += deleted
        if deleted < batch:
            return total
