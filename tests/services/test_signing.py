"""Release signatures: sign, verify, refuse tampering, trusted-keys file."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from services.signing import (
    KeysFileTrustedKeys,
    SignatureInvalid,
    StaticTrustedKeys,
    TrustedKeysError,
    canonical_release_bytes,
    generate_signing_key,
    key_id,
    load_or_create_signing_key,
    sign_release,
    verify_release,
    write_trusted_keys_file,
)

VERSION = "2026.11.0"
DIGEST = "sha256:" + "ab" * 32
COMPONENTS = [{"name": "adas", "version": "4.4.0"}, {"name": "gateway-fw", "version": "2.9.0"}]


def _release(**overrides: object) -> dict:
    release: dict = {"version": VERSION, "artifact_digest": DIGEST, "components": COMPONENTS}
    release.update(overrides)
    return release


def test_canonical_bytes_are_sorted_compact_utf8() -> None:
    data = canonical_release_bytes("1.0", "sha256:00", [{"version": "é", "name": "x"}])
    assert (
        data
        == (
            '{"artifactDigest":"sha256:00","components":[{"name":"x","version":"é"}],'
            '"version":"1.0"}'
        ).encode()
    )


def test_sign_verify_roundtrip() -> None:
    key = generate_signing_key()
    signature, kid = sign_release(key, VERSION, DIGEST, COMPONENTS)
    assert kid == key_id(key.public_key())
    assert kid.startswith("ed25519:") and len(kid) == len("ed25519:") + 16
    assert len(base64.b64decode(signature)) == 64
    trusted = StaticTrustedKeys([key.public_key()])
    verify_release(trusted, **_release(), signature=signature, key_id=kid)
    # Components are compared by content, not by key order inside each dict.
    reordered = [{"version": c["version"], "name": c["name"]} for c in COMPONENTS]
    verify_release(trusted, **_release(components=reordered), signature=signature, key_id=kid)


@pytest.mark.parametrize(
    "tampered",
    [
        {"version": "2026.11.1"},
        {"artifact_digest": "sha256:" + "cd" * 32},
        {"components": [{"name": "adas", "version": "4.4.1"}, COMPONENTS[1]]},
        {"components": COMPONENTS[:1]},
        {"components": list(reversed(COMPONENTS))},
    ],
    ids=["version", "digest", "component-version", "component-removed", "component-order"],
)
def test_tampered_release_is_refused(tampered: dict) -> None:
    key = generate_signing_key()
    signature, kid = sign_release(key, VERSION, DIGEST, COMPONENTS)
    trusted = StaticTrustedKeys([key.public_key()])
    with pytest.raises(SignatureInvalid, match="does not match") as info:
        verify_release(trusted, **_release(**tampered), signature=signature, key_id=kid)
    assert info.value.reason == "mismatch"


def test_unknown_key_is_refused() -> None:
    signer, other = generate_signing_key(), generate_signing_key()
    signature, kid = sign_release(signer, VERSION, DIGEST, COMPONENTS)
    with pytest.raises(SignatureInvalid, match="not among the trusted keys") as info:
        verify_release(
            StaticTrustedKeys([other.public_key()]), **_release(), signature=signature, key_id=kid
        )
    assert info.value.reason == "unknown_key"


def test_signature_by_another_key_under_a_trusted_id_is_refused() -> None:
    trusted_key, attacker = generate_signing_key(), generate_signing_key()
    signature, _ = sign_release(attacker, VERSION, DIGEST, COMPONENTS)
    trusted = StaticTrustedKeys([trusted_key.public_key()])
    with pytest.raises(SignatureInvalid) as info:
        verify_release(trusted, **_release(), signature=signature, key_id=key_id(trusted_key))
    assert info.value.reason == "mismatch"


@pytest.mark.parametrize(
    "signature",
    ["not base64!!", "", base64.b64encode(b"short").decode(), "QUJD", "A" * 87 + "="],
)
def test_malformed_signature_is_refused(signature: str) -> None:
    key = generate_signing_key()
    trusted = StaticTrustedKeys([key.public_key()])
    with pytest.raises(SignatureInvalid) as info:
        verify_release(trusted, **_release(), signature=signature, key_id=key_id(key))
    assert info.value.reason in {"malformed", "mismatch"}
    assert str(info.value)


def test_signing_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "release-key.pem"
    key = load_or_create_signing_key(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert key_id(again) == key_id(key)


def test_trusted_keys_file_roundtrip_merges_without_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "trusted-keys.json"
    first, second = generate_signing_key(), generate_signing_key()
    ids = write_trusted_keys_file(path, [first.public_key()])
    assert ids == [key_id(first)]
    ids = write_trusted_keys_file(path, [first.public_key(), second.public_key()])
    assert ids == [key_id(first), key_id(second)]
    document = json.loads(path.read_text())
    assert [entry["keyId"] for entry in document["keys"]] == ids
    assert all(entry["algorithm"] == "ed25519" for entry in document["keys"])
    assert all(len(base64.b64decode(entry["publicKey"])) == 32 for entry in document["keys"])

    trusted = KeysFileTrustedKeys(path)
    assert trusted.key_ids() == sorted(ids)
    signature, kid = sign_release(second, VERSION, DIGEST, COMPONENTS)
    verify_release(trusted, **_release(), signature=signature, key_id=kid)
    assert trusted.get("ed25519:0000000000000000") is None


def test_keys_file_picks_up_new_keys_and_missing_file_trusts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "trusted-keys.json"
    trusted = KeysFileTrustedKeys(path)
    key = generate_signing_key()
    assert trusted.get(key_id(key)) is None
    write_trusted_keys_file(path, [key.public_key()])
    assert trusted.get(key_id(key)) is not None


def test_malformed_keys_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "trusted-keys.json"
    path.write_text(json.dumps({"keys": [{"keyId": "k1", "publicKey": "not-a-key"}]}))
    with pytest.raises(TrustedKeysError, match="keys\\[0\\]"):
        KeysFileTrustedKeys(path).get("k1")
