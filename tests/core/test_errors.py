"""The error tree (core/errors.py): one status per code, headers SPEC asks for, and what a
client may read of a server-side failure."""

from __future__ import annotations

import pytest

from core import errors
from core.auth import TokenError
from services.signing import SignatureInvalid, TrustedKeysError


def _tree() -> list[type[errors.MotorcadeError]]:
    out, todo = [], [errors.MotorcadeError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_each_code_has_one_status() -> None:
    statuses: dict[str, set[int]] = {}
    for cls in _tree():
        statuses.setdefault(cls.code, set()).add(cls.status)
    assert {code: s for code, s in statuses.items() if len(s) > 1} == {}


@pytest.mark.parametrize(
    ("error", "header", "value"),
    [
        (errors.RateLimited("slow down", retry_after=7), "Retry-After", "7"),
        (errors.Overloaded(), "Retry-After", "1"),
        (errors.DependencyUnavailable(), "Retry-After", "5"),
        (errors.IdempotencyKeyInUse(), "Retry-After", "1"),
        (errors.Unauthenticated(), "WWW-Authenticate", 'Bearer realm="motorcade"'),
        (TokenError("token has expired"), "WWW-Authenticate", 'Bearer realm="motorcade"'),
    ],
)
def test_headers_spec_asks_for(error: errors.MotorcadeError, header: str, value: str) -> None:
    assert error.headers[header] == value


def test_stray_errors_belong_to_the_tree_under_their_code() -> None:
    assert TokenError("x").code == "UNAUTHENTICATED"
    assert SignatureInvalid("x", reason="mismatch").code == "RELEASE_SIGNATURE_INVALID"
    assert errors.RolloutNotFound("x").code == "NOT_FOUND"
    assert errors.TargetsChanged("x").code == "CONFLICT" and errors.TargetsChanged.retryable
    assert TrustedKeysError("x").status == 500


def test_a_misconfiguration_tells_the_client_nothing_of_it() -> None:
    error = TrustedKeysError("/etc/motorcade/keys.json: not valid JSON")
    assert error.message == "/etc/motorcade/keys.json: not valid JSON"  # for the log
    assert error.public_message == "internal error"
    assert errors.Conflict("release 1.0 is registered already").public_message == (
        "release 1.0 is registered already"
    )
