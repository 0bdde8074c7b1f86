"""The reference dashboard's server side: `/` and its files are public, `GET /me` tells the
page who signed in, and with an issuer configured the sign-in is the OIDC authorization code
flow with PKCE, against a real (small) issuer on a loopback port."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from api.dashboard import SIGN_IN_SECONDS, _seal
from core.settings import Settings
from services.stream import ticket_secret
from tests.api.conftest import served
from tests.api.test_envelopes import assert_error
from tests.httpserver import QuietHandler, serve

KEY = RSAKey.generate_key(2048, parameters={"kid": "dash"})
CLIENT_ID = "motorcade-dashboard"


async def test_the_page_and_its_files_are_public(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/ui/app.js">' in page.text
    for path in ("/ui/app.js", "/ui/api.js", "/ui/stream.js", "/ui/views/rollouts.js"):
        module = await http.get(path)
        assert module.status_code == 200, path
        assert "javascript" in module.headers["content-type"]
        assert module.headers["cache-control"] == "no-cache"  # an upgrade is seen at once
    # The page's own file under /ui has the page's headers too.
    assert (
        "frame-ancestors 'none'"
        in (await http.get("/ui/index.html")).headers["content-security-policy"]
    )
    config = (await http.get("/ui/config.json")).json()
    assert config == {"signIn": "token", "loginUrl": None, "apiBase": "/api/v1"}
    assert_error(await http.get("/ui/nothing-here.js"), 404, "NOT_FOUND")
    # Without an issuer configured there is no sign-in to start.
    assert_error(await http.get("/auth/login"), 422, "VALIDATION_ERROR")


class Issuer:
    """An OIDC issuer that signs every user in at once as alice (role operator): discovery,
    JWKS, an authorization endpoint that redirects back with a code, and a token endpoint
    that checks the PKCE verifier against the challenge it was given."""

    def __init__(self) -> None:
        self.base = ""
        self.challenges: dict[str, tuple[str, str]] = {}  # code -> (challenge, redirect_uri)
        self.authorize_queries: list[dict[str, str]] = []
        self.token_forms: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def token(self) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.base, "aud": "motorcade", "sub": "alice@example.com"}
        claims |= {"role": "operator", "iat": now, "exp": now + 300}
        return jwt.encode({"alg": "RS256", "kid": "dash"}, claims, KEY)


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    idp = Issuer()

    class Handler(QuietHandler):
        def reply(self, status: int, body: Any = None, location: str | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/.well-known/openid-configuration":
                self.reply(
                    200,
                    {
                        "issuer": idp.base,
                        "jwks_uri": f"{idp.base}/jwks",
                        "authorization_endpoint": f"{idp.base}/authorize",
                        "token_endpoint": f"{idp.base}/token",
                    },
                )
            elif url.path == "/jwks":
                self.reply(200, KeySet([KEY]).as_dict(private=False))
            elif url.path == "/authorize":
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                idp.authorize_queries.append(q)
                code = f"code-{len(idp.authorize_queries)}"
                idp.challenges[code] = (q.get("code_challenge", ""), q["redirect_uri"])
                back = urlencode({"code": code, "state": q["state"]})
                self.reply(302, location=f"{q['redirect_uri']}?{back}")
            else:
                self.reply(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            idp.token_forms.append(form)
            challenge, redirect_uri = idp.challenges.pop(form.get("code", ""), ("", ""))
            verifier = form.get("code_verifier", "").encode()
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if (
                form.get("grant_type") != "authorization_code"
                or not challenge
                or computed.decode() != challenge
                or form.get("redirect_uri") != redirect_uri
                or form.get("client_id") != CLIENT_ID
            ):
                self.reply(400, {"error": "invalid_grant"})
                return
            self.reply(
                200, {"access_token": idp.token(), "token_type": "Bearer", "expires_in": 300}
            )

    with serve(Handler) as base:
        idp.base = base
        yield idp


async def test_sign_in_through_the_issuer_with_pkce(api_settings: Settings, issuer: Issuer) -> None:
    async with served(api_settings, oidc_issuer=issuer.base, oidc_client_id=CLIENT_ID) as client:
        config = (await client.get("/ui/config.json")).json()
        assert config["signIn"] == "oidc" and config["loginUrl"] == "/auth/login"

        start = await client.get("/auth/login")
        assert start.status_code == 302
        assert start.headers["location"].startswith(f"{issuer.base}/authorize?")
        cookie = start.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Path=/auth" in cookie and "SameSite=lax" in cookie
        # The browser goes to the issuer, which sends it back with a code.
        async with httpx.AsyncClient() as browser:
            back = await browser.get(start.headers["location"])
        asked = issuer.authorize_queries[-1]
        assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
        assert asked["client_id"] == CLIENT_ID and asked["response_type"] == "code"
        assert asked["redirect_uri"] == f"{client.base_url}/auth/callback".replace(
            "//auth", "/auth"
        )
        callback = back.headers["location"]

        # Another sign-in's state is refused, and so is a callback without the cookie.
        wrong = callback.replace(f"state={asked['state']}", "state=forged")
        assert_error(await client.get(wrong), 401, "UNAUTHENTICATED")
        async with httpx.AsyncClient(base_url=str(client.base_url)) as stranger:
            assert_error(await stranger.get(callback), 401, "UNAUTHENTICATED")

        done = await client.get(callback)
        assert done.status_code == 302, done.text
        # The token never travels in a URL: it waits in a cookie only /auth/session reads.
        assert done.headers["location"] == "/"
        assert done.headers["cache-control"] == "no-store"
        handover = [
            c for c in done.headers.get_list("set-cookie") if c.startswith("motorcade_token=")
        ]
        assert len(handover) == 1
        for flag in ("HttpOnly", "Path=/auth", "SameSite=strict", "Max-Age=60"):
            assert flag in handover[0], handover[0]
        # The code was exchanged with the verifier the challenge was made from.
        assert issuer.token_forms[-1]["code_verifier"]
        taken = await client.post("/auth/session")
        assert taken.status_code == 200, taken.text
        token = taken.json()["token"]
        me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["data"]["subject"] == "alice@example.com"
        assert me.json()["data"]["canWrite"] is True
        # Collected once: the cookie is gone.
        assert_error(await client.post("/auth/session"), 401, "UNAUTHENTICATED")

        # A sign-in finishes once: the cookie is gone, a replayed callback is refused.
        replay = await client.get(callback)
        assert_error(replay, 401, "UNAUTHENTICATED")

        # The sign-in cookie is checked: a tampered one, one too old, and the issuer's refusal.
        await client.get("/auth/login")
        sealed = client.cookies.get("motorcade_signin", path="/auth")
        assert sealed
        body, mac = sealed.split(".")
        client.cookies.set("motorcade_signin", f"{body}.{'0' * len(mac)}", path="/auth")
        assert_error(await client.get(callback), 401, "UNAUTHENTICATED")
        secret = ticket_secret(None, api_settings.dev_key.get_secret_value())  # type: ignore[union-attr]
        old = {"state": "s", "verifier": "v", "at": int(time.time()) - SIGN_IN_SECONDS - 1}
        client.cookies.set("motorcade_signin", _seal(secret, old), path="/auth")
        assert_error(await client.get("/auth/callback?code=c&state=s"), 401, "UNAUTHENTICATED")
        fresh = {**old, "at": int(time.time())}
        client.cookies.set("motorcade_signin", _seal(secret, fresh), path="/auth")
        refused = await client.get("/auth/callback?error=access_denied&state=s")
        assert_error(refused, 401, "UNAUTHENTICATED")
        assert "access_denied" in refused.json()["error"]["message"]


async def test_an_issuer_that_does_not_answer_is_a_503(api_settings: Settings) -> None:
    async with served(
        api_settings, oidc_issuer="http://127.0.0.1:9", oidc_client_id=CLIENT_ID
    ) as client:
        assert_error(await client.get("/auth/login"), 503, "UNAVAILABLE")
