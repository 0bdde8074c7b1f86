"""Release signatures: ed25519 over a canonical JSON form of the release.

A release is signed over `canonical_release_bytes(version, artifact_digest, components)`:
JSON of `{"artifactDigest", "components", "version"}` with sorted keys, no whitespace, UTF-8.
The signature travels as base64 together with a key id (`ed25519:<16 hex of sha256(raw key)>`);
`POST /releases` verifies it against the artifact registry's trusted keys (`TrustedKeys`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.errors import Misconfigured, ReleaseSignatureInvalid

ALGORITHM = "ed25519"
SIGNATURE_BYTES = 64


class SignatureInvalid(ReleaseSignatureInvalid):
    """A release signature that must not be trusted. `reason` is a short machine-readable word:
    `unknown_key`, `malformed`, or `mismatch`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustedKeysError(Misconfigured):
    """A trusted-keys file that cannot be read (bad JSON, bad key material)."""


# --- canonical form -----------------------------------------------------------------------


def canonical_release_bytes(version: str, artifact_digest: str, components: list[dict]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    document = {"version": version, "artifactDigest": artifact_digest, "components": components}
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# --- keys ---------------------------------------------------------------------------------


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustedKeysError(f"{path} does not hold an ed25519 private key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM (PKCS8) key at `path`, or create one there (mode 0600, parents created)."""
    path = Path(path)
    if path.exists():
        return load_signing_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile: use theirs
        return load_signing_key(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    os.chmod(path, 0o600)
    return key


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def public_key_to_base64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_bytes(public_key)).decode("ascii")


def public_key_from_base64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise TrustedKeysError("public key is not base64 of 32 raw ed25519 bytes") from exc


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`ed25519:` + the first 16 hex characters of sha256 of the raw public key."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    return f"{ALGORITHM}:" + hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


def sign_release(
    private_key: Ed25519PrivateKey,
    version: str,
    artifact_digest: str,
    components: list[dict],
) -> tuple[str, str]:
    """Sign a release; return (base64 signature, key id)."""
    message = canonical_release_bytes(version, artifact_digest, components)
    signature = base64.b64encode(private_key.sign(message)).decode("ascii")
    return signature, key_id(private_key.public_key())


# --- trusted keys (the artifact registry's view) -------------------------------------------


class TrustedKeys(Protocol):
    """Where the artifact registry's trusted release-signing keys come from.

    `KeysFileTrustedKeys` reads a JSON file (`MOTORCADE_TRUSTED_KEYS_FILE`). The interface leaves
    room for other sources, e.g. an OCI registry with cosign public keys or Sigstore bundles:
    such an implementation only has to map a key id to an ed25519 public key (or None).
    """

    def get(self, key_id: str) -> Ed25519PublicKey | None: ...


class StaticTrustedKeys:
    """Trusted keys held in memory (tests, embedding)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]) -> None:
        if isinstance(keys, Mapping):
            self._keys = dict(keys)
        else:
            self._keys = {key_id(k): k for k in keys}

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)


def _read_keys_file(path: Path) -> dict[str, Ed25519PublicKey]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrustedKeysError(f"{path}: not valid JSON ({exc.msg})") from exc
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TrustedKeysError(f'{path}: expected {{"keys": [...]}}')
    keys: dict[str, Ed25519PublicKey] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("keyId"), str):
            raise TrustedKeysError(f"{path}: keys[{index}] needs a string keyId")
        algorithm = entry.get("algorithm", ALGORITHM)
        if algorithm != ALGORITHM:
            raise TrustedKeysError(f"{path}: keys[{index}] algorithm {algorithm!r} unsupported")
        try:
            keys[entry["keyId"]] = public_key_from_base64(str(entry.get("publicKey", "")))
        except TrustedKeysError as exc:
            raise TrustedKeysError(f"{path}: keys[{index}]: {exc}") from exc
    return keys


class KeysFileTrustedKeys:
    """Trusted keys from a JSON file:
    `{"keys": [{"keyId": "...", "algorithm": "ed25519", "publicKey": "<base64 raw 32 bytes>"}]}`.

    The file is re-read when its modification time changes, so adding a key needs no restart.
    A missing file trusts nothing.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._keys = _read_keys_file(self.path)
            self._stamp = stamp

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        self._refresh()
        return self._keys.get(key_id)

    def key_ids(self) -> list[str]:
        self._refresh()
        return sorted(self._keys)


def write_trusted_keys_file(path: Path, public_keys: Iterable[Ed25519PublicKey]) -> list[str]:
    """Add `public_keys` to the trusted-keys file at `path` (created if missing), keeping the
    entries already there and never duplicating a key id. Written atomically. Returns the key
    ids now in the file."""
    path = Path(path)
    entries: list[dict[str, Any]] = []
    if path.exists():
        document = json.loads(path.read_text(encoding="utf-8") or "{}")
        entries = list(document.get("keys", [])) if isinstance(document, dict) else []
    seen = {entry.get("keyId") for entry in entries if isinstance(entry, dict)}
    for public_key in public_keys:
        kid = key_id(public_key)
        if kid in seen:
            continue
        seen.add(kid)
        entries.append(
            {"keyId": kid, "algorithm": ALGORITHM, "publicKey": public_key_to_base64(public_key)}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"keys": entries}, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return [str(entry["keyId"]) for entry in entries]


# --- verification -------------------------------------------------------------------------


def verify_release(
    trusted: TrustedKeys,
    *,
    version: str,
    artifact_digest: str,
    components: list[dict],
    signature: str,
    key_id: str,
) -> None:
    """Return if `signature` is a valid signature of the release by a trusted key; else raise
    `SignatureInvalid` saying why (unknown key, malformed signature, or mismatch)."""
    public_key = trusted.get(key_id)
    if public_key is None:
        raise SignatureInvalid(
            f"signing key {key_id!r} is not among the trusted keys", reason="unknown_key"
        )
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureInvalid("signature is not valid base64", reason="malformed") from exc
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureInvalid(
            f"signature must be {SIGNATURE_BYTES} bytes of ed25519, got {len(raw)}",
            reason="malformed",
        )
    try:
        message = canonical_release_bytes(version, artifact_digest, components)
    except (TypeError, ValueError) as exc:
        raise SignatureInvalid(
            "release fields cannot be put in canonical form", reason="malformed"
        ) from exc
    try:
        public_key.verify(raw, message)
    except InvalidSignature as exc:
        raise SignatureInvalid(
            f"signature does not match release {version!r} (version, artifactDigest and "
            f"components as signed by {key_id})",
            reason="mismatch",
        ) from exc
