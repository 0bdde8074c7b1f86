"""POST /releases on the real app: a release signed by a trusted key is registered (and
audited) once; a bad, tampered or untrusted signature is 422 RELEASE_SIGNATURE_INVALID and
stores nothing; a second registration of a version is 409; a malformed body is 422."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.settings import Settings
from services.signing import generate_signing_key, sign_release
from tests.api.conftest import bearer, serve_app
from tests.factories import COMPONENTS

URL = "/api/v1/releases"
DIGEST = "sha256:" + "cd" * 32


def signed(key: Ed25519PrivateKey, version: str, changes: dict | None = None) -> dict[str, Any]:
    signature, kid = sign_release(key, version, DIGEST, COMPONENTS)
    body = {
        "version": version,
        "components": COMPONENTS,
        "artifactDigest": DIGEST,
        "signature": signature,
        "signingKeyId": kid,
        "notes": "from CI",
    }
    return {**body, **(changes or {})}


def stored(database_url: str, version: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM releases WHERE version = %s", (version,)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_signed_release_is_registered_once_and_audited(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    viewer: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    version = f"{prefix}2028.1.0"
    subject = f"{prefix}ci"
    operator = bearer(token("operator", subject=subject))
    r = await http.post(URL, json=signed(signing_key, version), headers=operator)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/api/v1/releases/{version}"
    data = r.json()["data"]
    assert data["version"] == version and data["createdBy"] == subject
    assert data["components"] == COMPONENTS and data["artifactDigest"] == DIGEST
    got = await http.get(f"{URL}/{version}", headers=viewer)
    assert got.status_code == 200 and got.json()["data"]["signature"] == data["signature"]
    again = await http.post(URL, json=signed(signing_key, version), headers=operator)
    assert again.status_code == 409 and again.json()["error"]["code"] == "CONFLICT"
    assert stored(database_url, version) == 1
    audit = await http.get(
        "/api/v1/audit-log", params={"actor": subject, "action": "release.created"}, headers=viewer
    )
    assert [e["targetId"] for e in audit.json()["data"]] == [version]


@pytest.mark.parametrize("case", ["tampered", "other_key", "malformed", "wrong_size"])
async def test_a_bad_signature_is_refused_and_nothing_is_stored(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    case: str,
) -> None:
    version = f"{prefix}2028.2.0"
    body = signed(signing_key, version)
    expected = {"tampered": "mismatch", "other_key": "unknown_key"}.get(case, "malformed")
    if case == "tampered":  # the digest changed after signing
        body["artifactDigest"] = "sha256:" + "ef" * 32
    elif case == "other_key":  # signed by a key the registry does not trust
        body = signed(generate_signing_key(), version)
    elif case == "malformed":
        body["signature"] = "not base64!"
    else:
        body["signature"] = base64.b64encode(b"short").decode()
    r = await http.post(URL, json=body, headers=operator)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "RELEASE_SIGNATURE_INVALID"
    assert error["details"][0]["code"] == expected and error["details"][0]["field"] == "signature"
    assert stored(database_url, version) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"artifactDigest": "md5:abc"}, "artifactDigest"),
        ({"components": []}, "components"),
        ({"version": "bad version"}, "version"),
        ({"surprise": True}, "surprise"),
    ],
)
async def test_a_malformed_release_is_422(
    http: httpx.AsyncClient,
    operator: dict,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    change: dict,
    field: str,
) -> None:
    r = await http.post(
        URL, json=signed(signing_key, f"{prefix}2028.3.0", change), headers=operator
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert any(field in d["field"] for d in error["details"]), error


async def test_without_trusted_keys_no_release_registers(
    api_settings: Settings,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    version = f"{prefix}2028.4.0"
    async with serve_app(api_settings.model_copy(update={"trusted_keys_file": None})) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.post(
                URL, json=signed(signing_key, version), headers=bearer(token("operator"))
            )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["code"] == "no_keys"
    assert stored(database_url, version) == 0
