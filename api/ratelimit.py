"""Rate limits per caller (SPEC.md: 429 `RATE_LIMITED` with `Retry-After`): on writes, and on
telemetry.

A token bucket per caller per API process: `MOTORCADE_RATE_LIMIT_WRITE_BURST` writes at once,
refilled at `MOTORCADE_RATE_LIMIT_WRITES_PER_MINUTE` (0 turns the limit off). The caller is the
verified token's subject; a request without a valid token is counted by client address (it
gets 401 from its route, but cannot flood the token verifier for free). Reads are not limited.

`POST /api/v1/telemetry` is excluded from the write limit and has its own (`TelemetryLimits`):
counted in items (events + heartbeats), what the ingest path pays for, per token subject, with
separate budgets for devices (one vehicle each) and gateways (many vehicles behind one token).
A request costs one item before its body is read (so invalid or empty requests are limited
too) and the rest of its items once parsed. The ingest queue's 503 `OVERLOADED` stays the
fleet-wide backpressure; this limit keeps one caller from taking the whole queue.
With N API replicas a caller may make up to N times the limit; the limit protects each
process, and a shared limiter (PostgreSQL or a gateway in front) can replace this one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from api.caller import caller_of, client_address, send_error
from core.auth import Principal
from core.errors import RateLimited
from core.settings import Settings
from models.enums import Role

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TELEMETRY_PATH = "/api/v1/telemetry"
# A stream ticket is minted every ticket lifetime by every open stream (the stream ends when
# its ticket does): counting it as a write would spend a user's write budget, one per open
# tab a minute, and a 429 would end the stream. Minting costs one HMAC: no row, no Temporal.
TICKETS_PATH = "/api/v1/stream/tickets"
EXCLUDED_PATHS = frozenset({TELEMETRY_PATH, TICKETS_PATH})


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """`take(caller)`: None when the caller may proceed, else the seconds until it may."""

    def __init__(
        self,
        *,
        per_minute: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 100_000,
    ) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, caller: str, cost: float = 1.0) -> float | None:
        """Take `cost` tokens (at most the burst: a cost larger than the bucket waits for a
        full one)."""
        if not self.enabled:
            return None
        cost = min(cost, self.burst)
        now = self.clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_callers:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(tokens=self.burst, updated=now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        return (cost - bucket.tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled (forgetting them changes nothing); if every
        caller is active, drop the oldest half."""
        full_after = self.burst / self.rate
        idle = [k for k, b in self._buckets.items() if now - b.updated >= full_after]
        for key in idle:
            del self._buckets[key]
        if len(self._buckets) >= self.max_callers:
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in by_age[: len(by_age) // 2]:
                del self._buckets[key]


def retry_after_header(seconds: float) -> int:
    """Whole seconds, at least 1 (Retry-After is an integer)."""
    return max(1, math.ceil(seconds))


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        per_minute: float,
        burst: int,
        excluded_paths: frozenset[str] = EXCLUDED_PATHS,
    ) -> None:
        self.app = app
        self.limiter = TokenBucketLimiter(per_minute=per_minute, burst=burst)
        self.excluded_paths = excluded_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.limiter.enabled
            or scope["method"] not in WRITE_METHODS
            or not scope["path"].startswith("/api/")
            or scope["path"].rstrip("/") in self.excluded_paths
        ):
            await self.app(scope, receive, send)
            return
        principal = await caller_of(scope)
        caller = f"sub:{principal.subject}" if principal else f"addr:{client_address(scope)}"
        wait = self.limiter.take(caller)
        if wait is None:
            await self.app(scope, receive, send)
            return
        seconds = retry_after_header(wait)
        await send_error(
            scope,
            send,
            RateLimited(
                f"too many writes: at most {self.limiter.burst:g} at once and "
                f"{self.limiter.rate * 60:g} a minute per caller; retry in {seconds} s",
                retry_after=seconds,
            ),
        )


class TelemetryLimits:
    """The telemetry budgets of one process: a token bucket of items per device subject and
    one per gateway subject (`MOTORCADE_RATE_LIMIT_{DEVICE,GATEWAY}_TELEMETRY_*`; 0 a minute
    turns one off)."""

    def __init__(self, settings: Settings) -> None:
        self.limiters = {
            Role.DEVICE: TokenBucketLimiter(
                per_minute=settings.rate_limit_device_telemetry_items_per_minute,
                burst=settings.rate_limit_device_telemetry_burst,
            ),
            Role.GATEWAY: TokenBucketLimiter(
                per_minute=settings.rate_limit_gateway_telemetry_items_per_minute,
                burst=settings.rate_limit_gateway_telemetry_burst,
            ),
        }

    def charge(self, principal: Principal, items: int) -> None:
        """Take `items` from the caller's bucket, or raise 429 `RATE_LIMITED`."""
        limiter = self.limiters.get(principal.role)
        if limiter is None or items <= 0:
            return
        wait = limiter.take(principal.subject, float(items))
        if wait is None:
            return
        seconds = retry_after_header(wait)
        raise RateLimited(
            f"too much telemetry from this {principal.role.value}: at most "
            f"{limiter.burst:g} items (events + heartbeats) at once and "
            f"{limiter.rate * 60:g} a minute per token; retry in {seconds} s",
            retry_after=seconds,
        )


def _too_many(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
    }


def document_rate_limits(schema: dict[str, Any]) -> None:
    """Add the 429 answer (with Retry-After) to every limited write of the OpenAPI document,
    and to POST /telemetry (its own limit)."""
    for path, operations in schema.get("paths", {}).items():
        if path == TELEMETRY_PATH and "post" in operations:
            operations["post"].setdefault("responses", {})["429"] = _too_many(
                "RATE_LIMITED: too many telemetry items (events + heartbeats) by this device "
                "or gateway token; retry after `Retry-After` seconds"
            )
            continue
        if not path.startswith("/api/") or path in EXCLUDED_PATHS:
            continue
        for method, operation in operations.items():
            if method.upper() not in WRITE_METHODS:
                continue
            operation.setdefault("responses", {})["429"] = _too_many(
                "RATE_LIMITED: too many writes by this caller; retry after `Retry-After` seconds"
            )
