"""The identity provider's keys under trouble: a real HTTP server plays the issuer (its
discovery document and JWKS), and is made to fail, hang (accept connections and never answer)
or stop. Every assertion counts what the server saw and what the client attempted, never a
time. The cache's clock is a test clock where the test moves time on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from prometheus_client import REGISTRY

from core.auth import JwksCache, Principal, TokenError, TokenVerifier
from core.settings import Settings
from tests.httpserver import QuietHandler

KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})
ROTATED = ECKey.generate_key("P-256", parameters={"kid": "k2"})
TIMEOUT = 0.5  # the refresh bound these tests configure (not a measured time)


class Idp:
    """A real issuer on a loopback port: `mode` is "up", "error" (503) or "hang" (reads the
    request, never answers). Counts the connections it accepted and the requests it read.
    `stop()` closes the port (connections are refused); `start()` opens the same port again."""

    def __init__(self) -> None:
        self.mode = "up"
        self.keys: list[ECKey] = [KEY]
        self.accepted = 0
        self.requests: list[str] = []
        self.release = threading.Event()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        idp = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                idp.requests.append(self.path)
                if idp.mode == "hang":
                    idp.release.wait()
                    return
                body: Any = None
                if idp.mode == "up" and self.path == "/.well-known/openid-configuration":
                    body = {"issuer": idp.base, "jwks_uri": f"{idp.base}/jwks"}
                elif idp.mode == "up" and self.path == "/jwks":
                    body = KeySet(list(idp.keys)).as_dict(private=False)
                data = json.dumps(body).encode()
                self.send_response(200 if body is not None else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def get_request(self) -> Any:
                request = super().get_request()
                idp.accepted += 1
                return request

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self.release = threading.Event()


@pytest.fixture
def idp() -> Iterator[Idp]:
    server = Idp()
    server.start()
    yield server
    if server._server is not None:
        server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A verifier over a JwksCache whose HTTP client counts the requests it attempts (each
    one a connection attempt here: the client keeps no connection a hang left behind)."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.attempts = 0

        async def count(_: httpx.Request) -> None:
            self.attempts += 1

        self.client = httpx.AsyncClient(timeout=TIMEOUT, event_hooks={"request": [count]})
        self.jwks = JwksCache(settings, self.client, clock=clock)
        self.verifier = TokenVerifier(settings, self.jwks)

    async def settled(self) -> None:
        """Until the refresh running in the background (if any) has ended."""
        task = self.jwks._refresh
        if task is not None:
            await task

    async def verify_all(self, tokens: list[str]) -> list[Principal | BaseException]:
        return await asyncio.gather(
            *(self.verifier.verify(t) for t in tokens), return_exceptions=True
        )


def settings_for(idp: Idp, **kw: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        env="test", oidc_issuer=idp.base, jwks_timeout_seconds=TIMEOUT, _env_file=None, **kw
    )


@pytest.fixture
async def rig(idp: Idp) -> AsyncIterator[Rig]:
    made = Rig(settings_for(idp), Clock())
    yield made
    await made.verifier.aclose()


def tokens(idp: Idp, n: int, key: ECKey = KEY, kid: str = "k1") -> list[str]:
    """`n` different tokens (nothing the verifier has seen), signed by `key`."""
    now = int(time.time())
    claims = {"iss": idp.base, "aud": "motorcade", "role": "viewer", "exp": now + 600}
    return [
        jwt.encode({"alg": "ES256", "kid": kid}, {**claims, "sub": f"user-{n}-{i}-{now}"}, key)
        for i in range(n)
    ]


def refreshes(outcome: str) -> float:
    """motorcade_jwks_refreshes_total{outcome} as /metrics shows it."""
    return REGISTRY.get_sample_value("motorcade_jwks_refreshes_total", {"outcome": outcome}) or 0


def refused(results: list[Any]) -> int:
    return sum(isinstance(r, TokenError) for r in results)


def verified(results: list[Any]) -> int:
    return sum(isinstance(r, Principal) for r in results)


@pytest.mark.parametrize("trouble", ["hang", "stopped", "error"])
async def test_an_idp_in_trouble_costs_one_fetch_for_100_new_tokens(idp: Idp, trouble: str) -> None:
    """100 concurrent verifications of new tokens while the issuer hangs (accepts, never
    answers), is stopped (connection refused) or answers 503: ONE refresh is attempted and all
    100 share its outcome; more tokens meanwhile attempt nothing (back-off). With the issuer
    back, one refresh (discovery, then the key set) serves the next 100."""
    clock = Clock()
    rig = Rig(settings_for(idp), clock)
    errors, oks = refreshes("error"), refreshes("ok")
    try:
        if trouble == "stopped":
            idp.stop()
        else:
            idp.mode = trouble
        results = await rig.verify_all(tokens(idp, 100))
        assert refused(results) == 100, [r for r in results if not isinstance(r, TokenError)][:3]
        assert rig.attempts == 1
        assert idp.accepted == (0 if trouble == "stopped" else 1)
        assert len(idp.requests) == (0 if trouble == "stopped" else 1)

        results = await rig.verify_all(tokens(idp, 100))  # within the back-off: no attempt
        assert refused(results) == 100 and rig.attempts == 1

        if trouble == "stopped":
            idp.start()  # the same port again
        else:
            idp.release.set()
        idp.mode = "up"
        seen = len(idp.requests)
        clock.now += settings_for(idp).jwks_min_refresh_seconds
        results = await rig.verify_all(tokens(idp, 100))
        assert verified(results) == 100, [r for r in results if not isinstance(r, Principal)][:3]
        assert rig.attempts == 3  # + discovery and the key set, once
        assert idp.requests[seen:] == ["/.well-known/openid-configuration", "/jwks"]
        assert (refreshes("error") - errors, refreshes("ok") - oks) == (1, 1)
    finally:
        await rig.verifier.aclose()


async def test_expired_keys_are_refreshed_once_and_served_meanwhile(idp: Idp) -> None:
    """At JWKS expiry, 100 concurrent new tokens: the cached keys serve them all while ONE
    refresh runs (no request waits for it)."""
    clock = Clock()
    rig = Rig(settings_for(idp), clock)
    try:
        assert verified(await rig.verify_all(tokens(idp, 1))) == 1
        assert rig.attempts == 2  # discovery, keys
        clock.now += settings_for(idp).jwks_cache_seconds
        idp.mode = "hang"  # the refresh will not come back before these are answered
        assert verified(await rig.verify_all(tokens(idp, 100))) == 100
        assert rig.attempts == 3 and rig.jwks.fetches == 2  # one refresh: the cached URL
    finally:
        await rig.verifier.aclose()


async def test_stale_while_error_is_bounded(idp: Idp) -> None:
    """Keys past their cache time are still used while the issuer fails, for
    MOTORCADE_JWKS_STALE_SECONDS; one attempt per back-off period; then refused."""
    clock = Clock()
    settings = settings_for(idp, jwks_stale_seconds=600, jwks_min_refresh_seconds=30)
    rig = Rig(settings, clock)
    try:
        assert verified(await rig.verify_all(tokens(idp, 1))) == 1
        idp.mode = "error"
        clock.now += settings.jwks_cache_seconds + 1  # expired: a refresh is due
        assert verified(await rig.verify_all(tokens(idp, 50))) == 50
        await rig.settled()  # the background refresh failed (the server answers 503)
        assert rig.attempts == 3
        assert verified(await rig.verify_all(tokens(idp, 50))) == 50
        await rig.settled()
        assert rig.attempts == 3  # back-off: no second attempt yet
        clock.now += 30
        assert verified(await rig.verify_all(tokens(idp, 1))) == 1
        await rig.settled()
        attempts = rig.attempts
        assert attempts == 4  # one attempt per back-off period
        assert (
            idp.requests
            == ["/.well-known/openid-configuration", "/jwks"]
            + ["/.well-known/openid-configuration"] * 2
        )
        clock.now += 600  # past the stale bound
        results = await rig.verify_all(tokens(idp, 20))
        assert refused(results) == 20
        assert "unavailable" in str(results[0])
        assert rig.attempts == attempts + 1  # the 20 waited for one refresh, which failed
    finally:
        await rig.verifier.aclose()


async def test_an_unknown_kid_refreshes_once_per_interval_then_is_refused(idp: Idp) -> None:
    clock = Clock()
    settings = settings_for(idp)
    rig = Rig(settings, clock)
    try:
        assert verified(await rig.verify_all(tokens(idp, 1))) == 1
        assert rig.attempts == 2
        clock.now += settings.jwks_min_refresh_seconds  # a refresh is allowed again
        # 100 tokens naming keys the issuer does not publish: one refresh, then refused.
        forged = [t for n in range(10) for t in tokens(idp, 10, ROTATED, kid=f"nope-{n}")]
        results = await rig.verify_all(forged)
        assert refused(results) == 100 and "kid" in str(results[0])
        assert rig.attempts == 3
        results = await rig.verify_all(tokens(idp, 100, ROTATED, kid="k2"))
        assert refused(results) == 100 and rig.attempts == 3  # refused without a fetch
        # The issuer rotates to k2; after the interval, one refresh follows it.
        idp.keys = [KEY, ROTATED]
        clock.now += settings.jwks_min_refresh_seconds
        assert verified(await rig.verify_all(tokens(idp, 100, ROTATED, kid="k2"))) == 100
        assert rig.attempts == 4
        assert verified(await rig.verify_all(tokens(idp, 100))) == 100  # k1 still served
        assert rig.attempts == 4
    finally:
        await rig.verifier.aclose()


def held(verifier: TokenVerifier, token: str) -> bool:
    cache = verifier._verified
    assert cache is not None
    return hashlib.sha256(token.encode()).digest() in cache


async def test_the_token_cache_is_bounded_and_evicts_the_least_recently_used(idp: Idp) -> None:
    """A fleet's tokens outnumber the cache: it keeps MOTORCADE_TOKEN_CACHE_ENTRIES, and the
    tokens used least recently go first (a device that calls often stays cached)."""
    rig = Rig(settings_for(idp, token_cache_entries=100), Clock())
    try:
        first = tokens(idp, 100)
        assert verified(await rig.verify_all(first)) == 100
        await rig.verifier.verify(first[0])  # used again: now the most recent
        newer = tokens(idp, 50)
        for token in newer:
            await rig.verifier.verify(token)
        assert len(rig.verifier._verified or ()) == 100  # never more than its size
        assert held(rig.verifier, first[0])
        assert not any(held(rig.verifier, t) for t in first[1:51])  # least recently used
        assert all(held(rig.verifier, t) for t in first[51:] + newer)
    finally:
        await rig.verifier.aclose()


async def test_a_cached_token_expires_with_the_token(idp: Idp) -> None:
    """A verified token is remembered MOTORCADE_TOKEN_CACHE_SECONDS, never past its exp."""
    settings = settings_for(idp, token_leeway_seconds=0, token_cache_seconds=3600)
    rig = Rig(settings, Clock())
    try:
        now = int(time.time())
        claims = {"iss": idp.base, "aud": "motorcade", "role": "viewer", "sub": "short"}
        token = jwt.encode({"alg": "ES256", "kid": "k1"}, {**claims, "exp": now + 1}, KEY)
        await rig.verifier.verify(token)
        await asyncio.sleep(now + 1.1 - time.time())  # past its exp
        assert not held(rig.verifier, token)
        with pytest.raises(TokenError, match="expired"):
            await rig.verifier.verify(token)
    finally:
        await rig.verifier.aclose()
